"""Machine state: snapshots to a directory, restore, migration between qmpvm.

qmpvm holds both halves of a machine, its configuration (the store) and its
state (the engine's migration stream), and moves them as one thing:
``operations`` does the four commands; ``snapshot`` is the directory
format, pure; ``transfer`` drives the engine's migration over a descriptor
qmpvm opened; ``peer`` is the QMP client that talks to a destination qmpvm.
"""
