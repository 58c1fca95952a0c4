"""The integration suites run without the persistent compilation cache.

`tests/conftest.py` turns the cache on for the main suite. Here, gemma's
and kauldron's training steps close over real weights as constants, so
their executables run to hundreds of MB each (860 MB was seen), and
writing them to the cache took longer than compiling them again.
"""

import os

import jax

os.environ['PEFT_COMPILATION_CACHE'] = 'off'  # For the processes it starts.
jax.config.update('jax_compilation_cache_dir', None)
