"""The compiler passes, one module each (installed as fusetrace.passes)."""
