"""The public names of ``fip_fast`` (``FIP``, ``estimate_fisher``, ``purify``, ``spectral``, …) in a fresh
interpreter: importing a submodule must never replace one of them (the module ``fip_fast.purify`` used to
replace the function ``fip_fast.purify`` on first use)."""
import subprocess
import sys
import textwrap

from _hang import run


def _run(code: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-W", "error::DeprecationWarning:__main__", "-c", textwrap.dedent(code)])


def test_purify_stays_the_function_across_repeated_access_and_imports():
    r = _run("""
        import types
        import fip_fast
        f = fip_fast.purify
        assert isinstance(f, types.FunctionType), type(f)
        for _ in range(3):
            assert fip_fast.purify is f                  # the second access used to return the module
        import fip_fast.pipeline
        import fip_fast.purify                           # the old module path: an alias, never rebinding
        from fip_fast import purify
        assert purify is f and fip_fast.purify is f
        from fip_fast.pipeline import purify as p2, register_method
        assert p2 is f and callable(register_method)
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_old_module_path_forwards_with_a_deprecation_warning():
    r = run([sys.executable, "-c", textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            from fip_fast.purify import register_method, purify
        import fip_fast
        assert purify is fip_fast.purify and callable(register_method)
        assert any(issubclass(x.category, DeprecationWarning) and "fip_fast.pipeline" in str(x.message) for x in w)
        print("ok")
    """)])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_public_names_resolve():
    import fip_fast

    for name in ("FIP", "estimate_fisher", "purify", "spectral", "reference", "ops", "pipeline"):
        assert getattr(fip_fast, name) is not None
    assert set(fip_fast.__all__) <= set(dir(fip_fast))


def test_moved_module_paths_resolve_to_the_new_modules_with_a_warning():
    r = run([sys.executable, "-c", textwrap.dedent("""
        import importlib, warnings
        import fip_fast
        for old, new in fip_fast.MOVED_MODULES.items():
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                m = importlib.import_module("fip_fast." + old)
            assert m is importlib.import_module(new), old
            assert any(issubclass(x.category, DeprecationWarning) and new in str(x.message) for x in w), old
        from fip_fast.data import load_npz                    # the `from old import name` form
        from fip_fast.integrations import FIPCallback, drop_perturbation, find_fip    # now a package
        print("ok")
    """)])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_core_import_is_light():
    """``import fip_fast`` and the optimizer pull in neither the evaluation harness nor the CLI, the pipeline or
    optional dependencies (matplotlib, mlxtend, transformers, triton)."""
    r = run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import fip_fast
        from fip_fast import FIP, estimate_fisher, spectral
        heavy = [m for m in ("matplotlib", "mlxtend", "transformers", "triton", "fip_fast.evaluation",
                             "fip_fast.cli", "fip_fast.pipeline", "fip_fast.baselines") if m in sys.modules]
        print(heavy)
    """)])
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
