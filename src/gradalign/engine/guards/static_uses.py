"""Parameters read outside their own module, found in the source of the model's forward methods.

`ga.validate(model)` cannot run the model, but it can read its code: a forward that reads a
trainable parameter of one of its submodules (`F.linear(h, self.enc.weight.t())` in a tied
autoencoder) uses it where the engine sees no use, so the first backward refuses the model
(engine/guards/census.py). This finds such reads in the source (`self.<child>...<name>` where the
child owns the trainable parameter `name`), leaving out reads of metadata only (`.shape`,
`.dtype`, `.device`, `.size()`...) and torch's own modules (whose forwards read their
children's parameters only on their no-grad fast paths). It is a reading of the code, not of
the model's behaviour: a read on a path the forward never takes is reported too.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

from torch import nn

_METADATA = frozenset("shape dtype device size dim ndim numel requires_grad is_cuda layout nelement data_ptr "
                      "element_size is_floating_point is_complex is_contiguous stride".split())


def _forward_tree(cls: type) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def _self_chains(tree: ast.AST) -> set[tuple[str, ...]]:
    """Attribute chains self.a.b.c read in `tree` (a forward method: `self` is its first argument),
    except those read for metadata only."""
    function = tree.body[0] if isinstance(tree, ast.Module) and tree.body else None
    if not isinstance(function, ast.FunctionDef) or not function.args.args:
        return set()
    me = function.args.args[0].arg
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    chains = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(parents.get(node), ast.Attribute):
            continue  # only the longest chain (its outermost Attribute node)
        names, inner = [], node
        while isinstance(inner, ast.Attribute):
            names.append(inner.attr)
            inner = inner.value
        if not (isinstance(inner, ast.Name) and inner.id == me) or len(names) < 2:
            continue
        chains.add(tuple(reversed(names)))
    return chains


def _parameter_read(module: nn.Module, chain: tuple[str, ...]) -> tuple[str, nn.Parameter] | None:
    """(child path, parameter) for a chain child...name[.rest] that reads a child's parameter for
    more than its metadata (self.enc.weight.t(), not self.enc.weight.shape); None otherwise."""
    for i in range(1, len(chain)):
        try:
            child = module.get_submodule(".".join(chain[:i]))
        except AttributeError:
            return None
        p = child._parameters.get(chain[i])
        if p is not None:
            return (".".join(chain[:i]), p) if chain[i + 1:i + 2] == () or chain[i + 1] not in _METADATA else None
    return None


def reads_outside(model: nn.Module, served: dict[int, str], owned_by: dict[str, tuple[str, ...]]) -> list[str]:
    """One line per trainable served parameter (id -> full name in `served`) read as self.<child>.<name>
    in another module's forward; `owned_by`: {module path: child paths its rule serves}."""
    trees: dict[type, ast.AST | None] = {}
    problems = []
    for path, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith("torch.") or "forward" not in {k for c in cls.__mro__ for k in vars(c)}:
            continue
        if cls not in trees:
            trees[cls] = _forward_tree(cls)
        if trees[cls] is None:
            continue
        reads = {}
        for chain in sorted(_self_chains(trees[cls])):
            found = _parameter_read(module, chain)
            if found is not None and id(found[1]) in served and found[0] not in owned_by.get(path, ()):
                reads[id(found[1])] = found
        for key, (child, p) in reads.items():
            name = next(n for n, q in module.get_submodule(child)._parameters.items() if q is p)
            problems.append(
                f"{served[key]}: {cls.__name__}.forward ({path or '<model>'}) reads self.{child}.{name}, outside "
                f"{f'{path}.{child}' if path else child}'s own forward; a use there is refused at the first backward "
                "(the engine sees uses only in the forward of a module that owns the parameter). Fix: register the "
                "same Parameter on a small module whose forward does that computation (self.weight = enc.weight), "
                "or freeze it")
    return problems
