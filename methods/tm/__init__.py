"""The trajectory-matching engine behind ``methods/trajectory_matching.py`` (``tm``, ``tm_image``,
``tm_text``, ``tm_lora``).

``experts`` trains and caches expert trajectories; ``unroll`` computes meta-gradients through an
unrolled SGD inner loop (modes ``naive``, ``exact``, ``fd``); ``gram`` and ``lora`` are the fast
unrolls for linear heads and for LoRA adapters; ``profile`` measures the pixel-space unroll
(``python -m methods.tm.profile``).

May import: ``bench.protocol`` (student, recipe, towers' ops), ``datasets`` and the leaf modules
``bench.errors`` / ``bench.progress``; never the harness or another method module.
"""
