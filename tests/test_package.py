"""The package root: every public name resolves, and unknown names fail clearly."""

import importlib

import pytest


def test_public_api_resolves():
    pkg = importlib.import_module("bilevel_rlhf")
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name


def test_unknown_name_raises():
    pkg = importlib.import_module("bilevel_rlhf")
    with pytest.raises(AttributeError, match="no_such_name"):
        pkg.no_such_name  # noqa: B018
