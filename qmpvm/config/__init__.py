"""The machine's configuration: typed resources, pure updates, export/replay."""
