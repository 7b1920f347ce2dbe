"""Process set-up before JAX computes: the CPU split into devices (``host_devices``),
multi-host start-up (``distributed``) and the compilation cache (``compile_cache``).

May import: ``core``.
"""
