"""Test helpers shared across areas (importable as ``testkit`` because pytest puts tests/ on sys.path)."""
