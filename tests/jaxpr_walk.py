"""Walking a jaxpr with its nested jaxprs (pjit, custom_vjp, cond, scan, ...): for tests that assert structure."""


def all_eqns(jaxpr):
    """Every equation of `jaxpr` (a core.Jaxpr) and, depth-first, of the jaxprs in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)
