"""Test tooling shipped with flo_coord but separate from the library.

``fakellm``: a deterministic OpenAI/Ollama/Anthropic-compatible LLM server with named
faults. ``embedded``: a throwaway ``redis-server`` (or an in-process fakeredis) for tests
and the demo. Importable by users' own tests; nothing in the library imports them.
"""
