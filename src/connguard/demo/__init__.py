"""``connguard demo``: the user report, reproduced with stock Django and fixed with
connguard, on a throwaway PostgreSQL. ``connguard.demo.site`` is the report's site
(documents whose pages are images behind a permission query); the test suite and
the benchmarks run it under real servers too."""
