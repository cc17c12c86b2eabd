"""On a GPU: the compiled kernels against cuDNN (torch.nn on CUDA) with the same weights: outputs,
and gradients of a training step."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import persistrnn
from persistrnn import configs
from persistrnn.layers.check import relative_error, tolerance

pytestmark = pytest.mark.gpu

CASES = [
    ("lstm", 64, {}), ("lstm", 64, dict(bidirectional=True, num_layers=2)), ("lstm", 64, dict(proj_size=32)),
    ("lstm", 48, dict(batch_first=True)), ("gru", 128, {}), ("gru", 128, dict(bidirectional=True)),
    ("gru", 100, dict(num_layers=2, bias=False)),
]


def _pair(cell, hidden, dtype, kwargs):
    ours = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(64, hidden, device="cuda", dtype=dtype, **kwargs)
    ref = (nn.LSTM if cell == "lstm" else nn.GRU)(64, hidden, device="cuda", dtype=dtype, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval()


# an SM count no device has: what the planner gives where the SMs never limit the grid
UNLIMITED_SMS = 1 << 20


def _sms():
    return configs.device_sms(torch.device("cuda", torch.cuda.current_device()))


def _plan(cell, dtype, hidden, batch, directions, pass_="forward", proj_size=0, sms=None):
    """(config, waves, why): what the planner's static tables give a layer on this GPU (or on `sms`
    SMs): the config or None (then why), and its launches (configs.launch_waves)."""
    device = torch.device("cuda", torch.cuda.current_device())
    target = configs.target_of(device)
    if target is None:
        return None, None, f"no kernel tables for {torch.cuda.get_device_name(device)}"
    sms = sms or _sms()
    config, why = configs.kernel_config(cell, dtype, hidden, proj_size, batch, directions, sms, target, pass_)
    return config, config and configs.launch_waves(config, batch, hidden, directions, sms), why


def _skip_if_the_sms_are_too_few(cell, dtype, hidden, batch, directions, pass_="forward", proj_size=0):
    """Skip where this GPU's SMs are too few for the planner to give the layer a kernel config that a
    device with more SMs gets (one batch tile's SPLIT programs must all be resident at once)."""
    config, _, why = _plan(cell, dtype, hidden, batch, directions, pass_, proj_size)
    if config is None and _plan(cell, dtype, hidden, batch, directions, pass_, proj_size, UNLIMITED_SMS)[0]:
        pytest.skip(f"{pass_} pass on {_sms()} SMs: {why}")
    return config


def _expected_config(layer, x, pass_="forward"):
    """The config the planner's tables give for this layer and input on this GPU (None: torch)."""
    batch = x.shape[0] if layer.batch_first else x.shape[1]
    return _plan(layer._cell, x.dtype, layer.hidden_size, batch, 2 if layer.bidirectional else 1, pass_,
                 layer.proj_size)[0]


def _outputs(result):
    out, hidden = result
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    return (out, *hidden) if isinstance(hidden, tuple) else (out, hidden)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cell,hidden,kwargs", CASES)
def test_matches_cudnn(cell, hidden, kwargs, dtype):
    ours, ref = _pair(cell, hidden, dtype, kwargs)
    shape = (8, 100, 64) if kwargs.get("batch_first") else (100, 8, 64)
    x = torch.randn(*shape, device="cuda", dtype=dtype)
    with torch.no_grad(), persistrnn.backend("triton"):
        got = _outputs(ours(x))
        want = _outputs(ref(x))
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(dtype, "cuda")
    assert ours.last_dispatch.path == ("triton" if _expected_config(ours, x) else "torch"), ours.last_dispatch


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_matches_cudnn(cell):
    ours, ref = _pair(cell, 64, torch.float16, dict(bidirectional=True))
    seqs = [torch.randn(n, 64, device="cuda", dtype=torch.float16) for n in (50, 7, 33, 1)]
    x = pack_sequence(seqs, enforce_sorted=False)
    with torch.no_grad(), persistrnn.backend("triton"):
        got, want = _outputs(ours(x)), _outputs(ref(x))
    assert ours.last_dispatch.path == "triton"
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(torch.float16, "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell,hidden,kwargs", [("lstm", 512, {}), ("lstm", 1024, {}), ("gru", 512, {}),
                                                ("gru", 1024, dict(bidirectional=True)),
                                                ("lstm", 1024, dict(proj_size=64))])
def test_split_tier_matches_cudnn(cell, hidden, kwargs, dtype):
    ours, ref = _pair(cell, hidden, dtype, kwargs)
    x = torch.randn(64, 16, 64, device="cuda", dtype=dtype)
    directions = 2 if kwargs.get("bidirectional") else 1
    expected = _skip_if_the_sms_are_too_few(cell, dtype, hidden, 16, directions, proj_size=kwargs.get("proj_size", 0))
    if torch.cuda.get_device_capability()[0] >= 9:
        assert expected is not None and expected.block_h < hidden, "the sm_90 tables hold these in the split tier"
    with torch.no_grad(), persistrnn.backend("triton"):
        got, want = _outputs(ours(x)), _outputs(ref(x))
    assert ours.last_dispatch.path == ("triton" if expected else "torch"), ours.last_dispatch
    assert ours.last_dispatch.config == expected
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(dtype, "cuda")


def test_impossible_config_raises_instead_of_hanging():
    """One batch tile's programs must all be resident: SPLIT = 256 programs of 16 units (H = 4096)
    exceed any GPU's SMs, and a pinned config that asks for it raises before launching."""
    if _sms() >= 4096 // 16:
        pytest.skip(f"{_sms()} SMs hold the 256 programs")
    ours, _ = _pair("lstm", 4096, torch.float16, {})
    x = torch.randn(2, 16, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad(), persistrnn.backend("triton"), persistrnn.pin_config(block_h=16):
        with pytest.raises(ValueError, match="at once"):
            ours(x)


@pytest.mark.parametrize("cell,dtype,hidden,batch", [("lstm", torch.bfloat16, 1024, 256), ("gru", torch.float16, 768, 128),
                                                     ("lstm", torch.float32, 768, 16), ("gru", torch.float32, 1024, 64)])
def test_grid_larger_than_the_sms_runs_in_launches(cell, dtype, hidden, batch):
    """Bidirectional layers whose grid exceeds the SMs (large batch; fp32's 8-unit programs) run
    as several launches, forward and training, and match cuDNN."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("sized for the sm_90 tables")
    for pass_ in ("forward", "train"):
        _skip_if_the_sms_are_too_few(cell, dtype, hidden, batch, 2, pass_)
        config, waves, why = _plan(cell, dtype, hidden, batch, 2, pass_)
        assert config is not None, why
        if len(waves) == 1:
            pytest.skip(f"{pass_} pass: the grid of {configs.programs(config, batch, hidden, 2)} programs "
                        f"({config}) fits on {_sms()} SMs at once: one launch")
    ours, ref = _pair(cell, hidden, dtype, dict(bidirectional=True))
    x = torch.randn(16, batch, 64, device="cuda", dtype=dtype)
    with torch.no_grad(), persistrnn.backend("triton"):
        got, want = _outputs(ours(x)), _outputs(ref(x))
    assert ours.last_dispatch.path == "triton" and len(ours.last_dispatch.waves) > 1, ours.last_dispatch
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(dtype, "cuda")
    ours.train(), ref.train()
    grad_y = torch.randn(16, batch, 2 * hidden, device="cuda", dtype=dtype)
    with persistrnn.backend("triton"):
        got = _gradients(ours, x, grad_y)
    assert ours.last_dispatch.path == "triton" and len(ours.last_dispatch.waves) > 1, ours.last_dispatch
    want = _gradients(ref, x, grad_y)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(dtype, "cuda")


def test_barrier_timeout_raises_on_the_gpu(monkeypatch):
    """With no polls allowed, 32 programs cannot all meet at every one of 256 steps: the kernel
    must flag it and the host raise."""
    import persistrnn.kernels.exchange as exchange
    if _sms() < 512 // 16:
        pytest.skip(f"the 32 programs of a batch tile do not fit on {_sms()} SMs at once")
    monkeypatch.setitem(exchange.MAX_SPIN, "compiled", 0)
    ours, _ = _pair("gru", 512, torch.float16, {})
    x = torch.randn(256, 16, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad(), persistrnn.backend("triton"), persistrnn.pin_config(block_h=16):
        ours(x)  # no host sync in the launch: the flag is read at the next check point
        with pytest.raises(exchange.BarrierTimeout):
            persistrnn.raise_if_failed()
        ours(x)
        torch.cuda.synchronize()  # the flag's copy has landed: the next launch raises
        with pytest.raises(exchange.BarrierTimeout):
            ours(x)
        persistrnn.raise_if_failed()


def _gradients(layer, x, grad_y):
    """d input, d h0 (d c0) and d every parameter of one training step with output gradient grad_y."""
    x = x.detach().clone().requires_grad_()
    h0 = torch.randn(layer.num_layers * (2 if layer.bidirectional else 1), x.shape[0 if layer.batch_first else 1],
                     layer.proj_size or layer.hidden_size, device="cuda", dtype=x.dtype)
    state = h0.requires_grad_()
    if isinstance(layer, nn.LSTM):
        state = (h0, torch.zeros(*h0.shape[:2], layer.hidden_size, device="cuda", dtype=x.dtype).requires_grad_())
    out, hidden = layer(x, state)
    hidden = hidden if isinstance(hidden, tuple) else (hidden,)
    loss = (out * grad_y).sum() + sum(h.float().square().sum() for h in hidden)
    leaves = [x, *(state if isinstance(state, tuple) else (state,)), *layer.parameters()]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cell,hidden,kwargs", CASES + [("lstm", 512, {}), ("gru", 1024, {})])
def test_gradients_match_cudnn(cell, hidden, kwargs, dtype):
    ours, ref = _pair(cell, hidden, dtype, kwargs)
    ours.train(), ref.train()
    shape = (16, 64, 64) if kwargs.get("batch_first") else (64, 16, 64)
    x = torch.randn(*shape, device="cuda", dtype=dtype)
    grad_y = torch.randn(*shape[:2], (2 if kwargs.get("bidirectional") else 1) * (kwargs.get("proj_size") or hidden),
                         device="cuda", dtype=dtype)
    seed = torch.seed()
    with persistrnn.backend("triton"):
        torch.manual_seed(seed)
        got = _gradients(ours, x, grad_y)
    torch.manual_seed(seed)
    want = _gradients(ref, x, grad_y)
    assert ours.last_dispatch.path == ("triton" if _expected_config(ours, x, "train") else "torch"), \
        ours.last_dispatch
    names = ["input", "h0", "c0"][:len(got) - len(list(ours.parameters()))] + [n for n, _ in ours.named_parameters()]
    for name, g, w in zip(names, got, want):
        assert relative_error(g, w) <= tolerance(dtype, "cuda"), name


@pytest.mark.parametrize("hidden", [64, 512])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_gradients_match_cudnn(cell, hidden):
    """Per-row lengths in both directions, single program (64) and split tier (512 on sm_90)."""
    expected = _skip_if_the_sms_are_too_few(cell, torch.float16, hidden, 4, 2, "train")
    ours, ref = _pair(cell, hidden, torch.float16, dict(bidirectional=True))
    ours.train(), ref.train()
    seqs = [torch.randn(n, 64, device="cuda", dtype=torch.float16) for n in (50, 7, 33, 1)]
    grads = {}
    for name, layer in (("ours", ours), ("ref", ref)):
        data = [s.clone().requires_grad_() for s in seqs]
        with persistrnn.backend("triton"):
            out, _ = layer(pack_sequence(data, enforce_sorted=False))
        torch.manual_seed(0)
        loss = (out.data * torch.randn_like(out.data)).sum()
        grads[name] = torch.autograd.grad(loss, data + list(layer.parameters()))
    assert ours.last_dispatch.path == "triton" and ours.last_dispatch.config == expected, ours.last_dispatch
    if hidden == 512 and torch.cuda.get_device_capability()[0] >= 9:
        assert ours.last_dispatch.config.block_h < hidden
    for g, w in zip(grads["ours"], grads["ref"]):
        assert relative_error(g, w) <= tolerance(torch.float16, "cuda")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_batch_64_at_h1024_bidirectional_runs_the_kernels_in_both_passes(cell):
    """One batch tile of 64 rows, SPLIT = 64, both directions: 128 programs, at once on 132 SMs, in
    two launches (a direction each) on fewer."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the sm_80 tables do not hold this grid")
    for pass_ in ("forward", "train"):
        _skip_if_the_sms_are_too_few(cell, torch.float16, 1024, 64, 2, pass_)
    forward, _, _ = _plan(cell, torch.float16, 1024, 64, 2)
    if forward.block_b != 64:
        pytest.skip(f"on {_sms()} SMs the planner runs this layer in batch tiles of {forward.block_b} rows ({forward})")
    ours, ref = _pair(cell, 1024, torch.float16, dict(bidirectional=True))
    x = torch.randn(32, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad(), persistrnn.backend("triton"):
        got, want = _outputs(ours(x)), _outputs(ref(x))
    assert ours.last_dispatch.path == "triton" and ours.last_dispatch.config.block_b == 64, ours.last_dispatch
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(torch.float16, "cuda")
    ours.train(), ref.train()
    grad_y = torch.randn(32, 64, 2 * 1024, device="cuda", dtype=torch.float16)
    with persistrnn.backend("triton"):
        got = _gradients(ours, x, grad_y)
    assert ours.last_dispatch.path == "triton", ours.last_dispatch
    want = _gradients(ref, x, grad_y)
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(torch.float16, "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fast_math_accuracy_against_float64(cell, dtype):
    """tanh.approx in the compiled cells: ours (fp16/bf16) and cuDNN in the same dtype, each
    against torch.nn in float64 with the same weights; ours within the dtype's tolerance. The
    errors are printed for the report (pytest -rA shows them)."""
    _skip_if_the_sms_are_too_few(cell, dtype, 768, 16, 1)
    ours, ref = _pair(cell, 768, dtype, {})
    ref64 = (nn.LSTM if cell == "lstm" else nn.GRU)(64, 768, device="cuda", dtype=torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(256, 16, 64, device="cuda", dtype=dtype)
    with torch.no_grad(), persistrnn.backend("triton"):
        got, cudnn, exact = _outputs(ours(x)), _outputs(ref(x)), _outputs(ref64(x.double()))
    assert ours.last_dispatch.path == "triton", ours.last_dispatch
    errors = [(relative_error(g, e), relative_error(c, e)) for g, c, e in zip(got, cudnn, exact)]
    print(f"fast math {cell} {dtype} H=768 T=256: relative error against float64 (ours, cuDNN): {errors}")
    assert all(ours_err <= tolerance(dtype, "cuda") for ours_err, _ in errors)


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell,hidden,kwargs", CASES[:2] + CASES[4:6])
def test_autocast_matches_cudnn(cell, hidden, kwargs, amp_dtype):
    """Under CUDA autocast: the dtypes cuDNN's RNN returns, its values within the autocast
    dtype's tolerance, the kernels running, and fp32 gradients for the fp32 parameters."""
    ours, ref = _pair(cell, hidden, torch.float32, kwargs)
    ours.train(), ref.train()
    x = torch.randn(100, 8, 64, device="cuda")
    with torch.autocast("cuda", dtype=amp_dtype), persistrnn.backend("triton"):
        got, want = _outputs(ours(x)), _outputs(ref(x))
        sum(g.float().sum() for g in got).backward()
    assert [g.dtype for g in got] == [w.dtype for w in want]
    for g, w in zip(got, want):
        assert relative_error(g, w) <= tolerance(amp_dtype, "cuda")
    assert ours.last_dispatch.path == "triton", ours.last_dispatch
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("cell,hidden,block_h", [("lstm", 256, 64), ("gru", 512, None)])
def test_cuda_graph_capture_of_forward_and_training_step(cell, hidden, block_h):
    """A forward, and a whole training step (forward, backward, optimizer), captured once with
    torch.cuda.graph and replayed with fresh inputs copied in, give eager's results; the split tier
    (block_h < H) has no host sync left to break the capture, and its counters reset each replay."""
    import contextlib
    torch.manual_seed(0)
    pin = persistrnn.pin_config(block_h=block_h) if block_h else contextlib.nullcontext()
    model = (persistrnn.LSTM if cell == "lstm" else persistrnn.GRU)(64, hidden, device="cuda", dtype=torch.float16)
    eager = copy.deepcopy(model)
    static_x = torch.randn(128, 16, 64, device="cuda", dtype=torch.float16)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=1e-2)

    def step(layer, opt, x):
        opt.zero_grad(set_to_none=False)
        out = layer(x)[0]
        out.float().square().mean().backward()
        opt.step()
        return out

    with persistrnn.backend("triton"), pin:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # warm-up off the capture, of every pass captured below (each is its own kernel, compiled and its
        # module loaded at its first launch, which a capture does not permit); allocates the grads too
        with torch.cuda.stream(side):
            for _ in range(2):
                step(model, optimizer, static_x)
                step(eager, eager_optimizer, static_x)
                with torch.no_grad():
                    model(static_x)
                    eager(static_x)
        torch.cuda.current_stream().wait_stream(side)
        eager.load_state_dict(model.state_dict())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(model, optimizer, static_x)
        with torch.no_grad():
            forward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward_graph):
                static_forward = model(static_x)[0]
        for _ in range(3):
            x = torch.randn_like(static_x)
            static_x.copy_(x)
            graph.replay()
            want = step(eager, eager_optimizer, x)
            assert relative_error(static_out, want) <= tolerance(torch.float16, "cuda")
        assert model.last_dispatch.path == "triton"
        for got, ref in zip(model.parameters(), eager.parameters()):
            assert relative_error(got, ref) <= tolerance(torch.float16, "cuda")
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        forward_graph.replay()
        with torch.no_grad():
            assert relative_error(static_forward, model(x)[0]) <= tolerance(torch.float16, "cuda")
        persistrnn.raise_if_failed()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_fullgraph_training_step(mode):
    """torch.compile(fullgraph=True) of a model with a persistrnn LSTM on the GPU: the layer is one
    custom op per pass inside Inductor's graph ("reduce-overhead": inside its CUDA graphs), the
    loss and gradients as eager's."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = persistrnn.LSTM(64, 256, num_layers=2, device="cuda", dtype=torch.bfloat16)
            self.head = nn.Linear(256, 1, device="cuda", dtype=torch.bfloat16)

        def forward(self, x):
            return self.head(self.rnn(x)[0]).float().square().mean()

    torch._dynamo.reset()
    model = Model()
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    with persistrnn.backend("triton"):
        for _ in range(3):
            x = torch.randn(32, 16, 64, device="cuda", dtype=torch.bfloat16)
            loss = compiled(x)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            want = model(x)
            want_grads = torch.autograd.grad(want, list(model.parameters()))
            assert relative_error(loss, want) <= tolerance(torch.bfloat16, "cuda")
            for g, w in zip(grads, want_grads):
                assert relative_error(g, w) <= tolerance(torch.bfloat16, "cuda")
        assert model.rnn.last_dispatch.path == "triton"
        persistrnn.raise_if_failed()
