"""Shared fixtures: warehouse emulators (tests/warehouses.py) are loaded as a plugin."""

pytest_plugins = ["tests.warehouses"]
