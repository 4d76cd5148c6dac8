"""QEMU's introspected QAPI schema, used as data: checking, typing and merging."""
