# cython: language_level=3
"""The Cython hot paths: conf tokeniser, SMTP framing, shared counters, route table (each sans-I/O).

Each part lives in its own .pxi file and has a pure-Python twin with the same names in
fastrelay/_purepy/; the twin is the spec, and the tests run against both.
"""

include "_tokenizer.pxi"
include "_framing.pxi"
include "_shm.pxi"
include "_routetable.pxi"
