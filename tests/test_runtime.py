"""runtime: Adam in its fastest form, optimizer states that resume across implementations, torch.compile with a
fallback that hides no fault."""

import copy

import pytest
import torch

from aecurves import runtime


def test_adam_is_fused_where_torch_has_the_kernel_and_foreach_elsewhere():
    cpu = runtime.adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1, weight_decay=0.01)
    assert runtime.adam_implementation(cpu) == "fused"
    assert cpu.param_groups[0]["lr"] == 0.1 and cpu.param_groups[0]["weight_decay"] == 0.01
    complex_params = runtime.adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))], lr=0.1)
    assert runtime.adam_implementation(complex_params) == "foreach"  # the fused kernel takes real tensors only
    assert runtime.adam_implementation(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])) == "single-tensor"


def _steps(param, optimizer, grads):
    for g in grads:
        param.grad = g.clone()
        optimizer.step()


@pytest.mark.parametrize("saved_with", [{}, {"fused": True}, {"foreach": True}])
def test_a_saved_state_resumes_in_this_optimizers_implementation_on_the_same_trajectory(saved_with):
    """A checkpoint written before Adam was fused (single-tensor), or by a fused run, resumes in the optimizer's
    own implementation (load_state_dict alone would impose the saved one, e.g. fused where it has no kernel), and
    continues as the saved optimizer would have."""
    torch.manual_seed(0)
    grads = [torch.randn(4, 3, 2, 2) for _ in range(5)]
    original = torch.nn.Parameter(torch.randn(4, 3, 2, 2))
    saved_opt = torch.optim.Adam([original], lr=0.05, **saved_with)
    _steps(original, saved_opt, grads[:3])
    state = copy.deepcopy(saved_opt.state_dict())  # as read from a file: loading shares its tensors
    for implementation, make in (("fused", lambda p: runtime.adam([p], lr=0.05)),
                                 ("foreach", lambda p: torch.optim.Adam([p], lr=0.05, foreach=True))):
        resumed = torch.nn.Parameter(original.detach().clone())
        optimizer = make(resumed)
        runtime.load_optimizer_state(optimizer, copy.deepcopy(state))
        assert runtime.adam_implementation(optimizer) == implementation
        _steps(resumed, optimizer, grads[3:])
        reference = torch.nn.Parameter(original.detach().clone())
        continued = torch.optim.Adam([reference], lr=0.05, **saved_with)
        continued.load_state_dict(copy.deepcopy(state))
        _steps(reference, continued, grads[3:])
        torch.testing.assert_close(resumed.detach(), reference.detach(), rtol=1e-6, atol=1e-7)
        assert optimizer.state[resumed]["step"].item() == 5


def test_compile_falls_back_to_the_function_itself_and_says_so(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("InductorError: no working C++ compiler\nmore detail")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    notes = []
    f = runtime.CompiledOrEager(lambda x: x * 2, True, "model", notes.append)
    assert f.active
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert not f.active and len(notes) == 1
    assert "no working C++ compiler" in notes[0] and "uncompiled" in notes[0] and "more detail" not in notes[0]
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0)) and len(notes) == 1  # said once


def test_a_fallback_is_noted_once_for_the_record(monkeypatch):
    """`notes` gets the fallback's note (without the printed "note: "), once however many functions fall back, so a
    command's record says it ran uncompiled (issue 27, N10)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: lambda *a: (_ for _ in ()).throw(OSError("no cc")))
    printed, notes = [], []
    calls = [runtime.CompiledOrEager(lambda x: x * 3, True, "network", printed.append, notes) for _ in range(2)]
    assert [f(2) for f in calls] == [6, 6] and not any(f.active for f in calls)
    assert notes == ["--compile: torch.compile could not compile the network (OSError: no cc); it runs uncompiled, "
                     "with the same numbers"]
    assert printed == [f"note: {notes[0]}"] * 2


def test_after_one_compiled_call_succeeds_errors_propagate(monkeypatch):
    calls = []

    def flaky_compile(fn, **kwargs):
        def compiled(x):
            calls.append(x)
            if len(calls) > 1:
                raise ValueError("a fault in the model")
            return fn(x)
        return compiled

    monkeypatch.setattr(torch, "compile", flaky_compile)
    f = runtime.CompiledOrEager(lambda x: x + 1, True, "model", lambda note: pytest.fail(note))
    assert f(1) == 2
    with pytest.raises(ValueError, match="a fault in the model"):
        f(1)


def test_without_compile_nothing_is_compiled(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile was called"))
    f = runtime.CompiledOrEager(lambda x: x - 1, False, "model")
    assert f(3) == 2 and not f.active
