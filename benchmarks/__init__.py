"""selcache's benchmark suite: selcache against semodule and secilc, side by
side, on Debian's real refpolicy and on larger synthetic stores. Not tests:
pytest never collects this directory. Run it with ``make bench``."""
