"""Lua scripts run by TokenFlow, one file per script (see each file's header)."""
