"""Holds the AVX2+FMA build of the compiled operators, ``_C``; :mod:`ntl_fast._extension` loads it
as ``ntl_fast._C`` on CPUs that run it. Nothing here is imported directly."""
