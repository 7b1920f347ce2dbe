"""Process set-up before JAX computes: the CPU split into devices (``host_devices``),
multi-host start-up (``distributed``), the supervisor that turns a lost coordinator's C++
crash report into one line (``supervise``) and the compilation cache (``compile_cache``).

May import: ``core``.
"""
