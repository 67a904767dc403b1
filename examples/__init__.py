"""Example consumers of Earshot's event streams (docs/consumers.md): agent assist and routing."""
