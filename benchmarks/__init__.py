"""Benchmarks for tisdpo: one CLI (``python -m benchmarks``), synthetic inputs, peers side by side.

Modules: ``shapes`` (LM-head presets), ``providers`` (ours and the peers), ``ops`` (what is
timed), ``measure`` (timing, memory, flops, errors), ``results`` (long-format CSV and tables),
``plot`` (PNG plots), ``readme_table`` (the README's results table), ``e2e_long`` (the
end-to-end long-sequence training study). Importing this package does no work.
"""
