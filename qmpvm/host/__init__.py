"""Host init: what qmpvm opens and serves on the host for the engine (consoles)."""
