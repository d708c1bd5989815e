"""What a traced program's main loop waits on: the host clocks read by `return_timings` must
be data dependencies of the decode loop, or a GPU runtime may read them after it has run."""

import functools
import sys

import jax
from jax.extend.core import ClosedJaxpr, Var


def trace_program(module_name: str, run) -> ClosedJaxpr:
    """The jaxpr of `module._program` as `run()` (a compile_only call) would compile it;
    nothing is compiled."""
    module = sys.modules[module_name]
    program, traced = module._program, []

    class Spy:
        def lower(self, *args, **settings):
            traced.append(jax.make_jaxpr(functools.partial(program, **settings))(*args))
            return Spy()

        def compile(self):
            return None

    module._program = Spy()
    try:
        run()
    finally:
        module._program = program
    (jaxpr,) = traced
    return jaxpr


def clocks_the_loop_waits_on(closed: ClosedJaxpr) -> tuple[int, int]:
    """(host callbacks before the program's last top-level while loop, how many of them the
    loop's inputs depend on)."""
    jaxpr = closed.jaxpr
    while len(jaxpr.eqns) == 1 and "jaxpr" in jaxpr.eqns[0].params:  # the jit wrapper
        inner = jaxpr.eqns[0].params["jaxpr"]
        jaxpr = getattr(inner, "jaxpr", inner)
    deps, callbacks, loop_deps = {}, [], None
    for i, eqn in enumerate(jaxpr.eqns):
        found = set().union(*(deps.get(v, set()) for v in eqn.invars
                              if isinstance(v, Var)))
        if eqn.primitive.name == "io_callback":
            callbacks.append(i)
            found = found | {i}
        elif eqn.primitive.name == "while":
            loop_deps = (len(callbacks), found)
        for v in eqn.outvars:
            deps[v] = found
    assert loop_deps is not None, "no top-level while loop"
    before, found = loop_deps
    return before, len(found & set(callbacks[:before]))
