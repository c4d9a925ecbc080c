"""Fakes for third parties that cannot run here (an upstream Ollama, a cloud API).

Each replays the real wire format as the real API's docs describe it, on an
aiohttp server bound to port 0, with knobs to inject faults.
"""
