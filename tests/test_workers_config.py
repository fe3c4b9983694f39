"""Workers = N | auto and Momentum's spelling of it (eventloop, delivery_pool, event_loop):
multi-event-loops.md, ref-eventloop.md, ref-delivery-pool.md, ref-event-loop.md (issue 13)."""

from __future__ import annotations

import os

import pytest

from fastrelay.config import ConfigErrors, loads

POOL = 'eventloop "events_pool" {{ concurrency = {n} }}\n'


@pytest.mark.parametrize("text, workers", [
    ("", 1),
    ("Workers = 1\n", 1),
    ("Workers = 4\n", 4),
    ("workers = AUTO\n", os.cpu_count() or 1),
    # Momentum's example, step by step: the pool named by delivery_pool ...
    (POOL.format(n=3) + 'delivery_pool = "events_pool"\n', 3),
    # ... and by the listeners' event_loop as well (ESMTP and HTTP).
    (POOL.format(n=3) + 'delivery_pool = "events_pool"\nESMTP_Listener { event_loop = "events_pool"\n'
     'Listen "127.0.0.1:25" { } }\nHTTP_Listener { event_loop = "events_pool"\nListen "127.0.0.1:8080" { } }\n', 3),
    # event_loop alone names the pool too.
    (POOL.format(n=2) + 'ESMTP_Listener { event_loop = "events_pool"\nListen "127.0.0.1:25" { } }\n', 2),
    # Names are case-insensitive, as every name in the conf.
    ('EventLoop "Pool" { Concurrency = 2 }\ndelivery_pool = "pool"\n', 2),
    # Both spellings at once: fine when they agree.
    ("Workers = 2\n" + POOL.format(n=2) + 'delivery_pool = "events_pool"\n', 2),
    # A pool nobody names does not start workers (Momentum: it must be associated).
    (POOL.format(n=4), 1),
])
def test_worker_count(text, workers):
    assert loads(text).workers == workers


@pytest.mark.parametrize("text, message", [
    ("Workers = 0\n", "1:11: bad value for 'Workers': got '0'; expected a whole number from 1 to 256, or auto"),
    ("Workers = 257\n", "bad value for 'Workers': got '257'"),
    ("Workers = many\n", "bad value for 'Workers': got 'many'"),
    ('delivery_pool = "p"\n', "1:1: delivery_pool names eventloop 'p', which is not defined"),
    ('eventloop "p" { }\n', "1:1: eventloop p has no concurrency; expected concurrency = N (1 to 256)"),
    ('eventloop "p" { concurrency = 300 }\n', "1:17: bad value for 'concurrency': got 300; expected at most 256"),
    ('eventloop "p" { concurrency = 2 }\neventloop "P" { concurrency = 3 }\n', "2:1: eventloop P is already defined"),
    ('eventloop "p" { Hostname = "x" }\n', "option 'Hostname' is not valid in an eventloop stanza"),
    (POOL.format(n=2) + 'eventloop "other" { concurrency = 2 }\ndelivery_pool = "events_pool"\n'
     'ESMTP_Listener { event_loop = "other" Listen "127.0.0.1:25" { } }\n',
     "4:18: event_loop names eventloop 'other' but delivery_pool at <string>:3:1 names 'events_pool'"),
    ("Workers = 2\n" + POOL.format(n=3) + 'delivery_pool = "events_pool"\n',
     "1:1: Workers = 2 but eventloop 'events_pool' (named by delivery_pool at <string>:3:1) has concurrency = 3"),
    ('ESMTP_Listener { Listen ":25" { event_loop = "p" } }\n', "option 'event_loop' is not valid in a Listen stanza"),
    ('Domain "x.test" { Workers = 2 }\n', "option 'Workers' is not valid in a Domain stanza"),
])
def test_bad_worker_settings(text, message):
    with pytest.raises(ConfigErrors) as e:
        loads(text)
    assert any(message in str(err) for err in e.value.errors), [str(x) for x in e.value.errors]


def test_momentum_example_and_default_conf():
    from fastrelay.config import load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert load(os.path.join(root, "conf", "examples", "momentum_multi_event_loops.conf")).workers == 2
    assert load(os.path.join(root, "conf", "fastrelay.conf")).workers == 1


@pytest.mark.parametrize("text, option, value", [
    ("shared_counter_slots = 4096\n", "shared_counter_slots", 4096),
    ("worker_stop_timeout = 2m\n", "worker_stop_timeout", 120.0),
    ("worker_restart_delay = 100ms\nworker_restart_max = 5s\n", "worker_restart_max", 5.0),
])
def test_worker_limits_are_conf_options(text, option, value):
    assert loads(text).get(option) == value


def test_shared_counter_slots_has_a_floor():
    with pytest.raises(ConfigErrors, match="bad value for 'shared_counter_slots': got 10; expected a whole "
                                           "number from 1024"):
        loads("shared_counter_slots = 10\n")
