"""The ``modcache`` command line: the entry layer that assembles the engine, the operator and the consumer."""
