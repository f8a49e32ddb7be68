"""The autoregressive LM family (design.md 1.5, 2.1): the Block-Diffusion mask by perturbation,
Eq. 6 loss closed forms, decoding (one call per block per token, a hand-written Euler chain),
evaluation, parameter ownership, the fixed target table, and a short training smoke test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dblocks.config import TrainConfig
from dblocks.embedding import fixed_embedding
from dblocks.families.ar import ar_baseline_loss, ar_denoiser, ar_loss, evaluate_ar, generate_ar
from dblocks.levels import SigmaLevels
from dblocks.models.ar import AR_SIZES, ARBaseline, ARBlock, ar_attention_mask, ar_config, build_ar
from dblocks.plan import BlockSpec, make_plan
from dblocks.seeds import seeded
from dblocks.text import VOCAB, TextSplit, encode
from dblocks.trainer import BlockTrainer
from helpers import P_MEAN, P_STD, PHI, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN

LEVELS = SigmaLevels(SIGMA_MIN, SIGMA_MAX, P_MEAN, P_STD, SIGMA_DATA)
K = 84
LN_K = math.log(K)
TEXT = (
    "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
    "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n"
    "That thou her maid art far more fair than she.\n"
)


def _w(sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, written out (design.md 1.1)."""
    s = sigma.double()
    return (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2


def _windows(n: int, t: int, seed: int = 0) -> torch.Tensor:
    """n random (t+1)-character windows of TEXT, (n, t+1) int64."""
    ids = encode(TEXT)
    start = torch.randint(0, len(ids) - t - 1, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([ids[s : s + t + 1] for s in start.tolist()])


def _spec(index: int = 0, num_blocks: int = 1, num_layers: int = 2) -> BlockSpec:
    return BlockSpec(index, num_blocks, SIGMA_MIN, SIGMA_MAX, SIGMA_MIN, SIGMA_MAX, 0, num_layers)


def _perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Add noise to every parameter: adaLN-Zero and zero heads would otherwise hide every path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net.eval()


def _blocks(cfg, num_blocks: int, seed: int = 0, perturb: bool = True) -> tuple[list[ARBlock], list[BlockSpec]]:
    plan = make_plan(LEVELS, num_blocks, cfg.layers, gamma=0.1)
    nets = []
    for spec in plan:
        with seeded(100 + spec.index):
            net = build_ar(cfg, spec, baseline=False, seed=seed)
        nets.append(_perturbed(net, seed=spec.index) if perturb else net.eval())
    return nets, plan


def _count(params) -> int:
    return sum(p.numel() for p in params)


# ---- config -----------------------------------------------------------------------------------
def test_ar_size_registry_and_validation():
    assert set(AR_SIZES) == {"debug", "tiny"}
    tiny, debug = ar_config("tiny"), ar_config("debug")
    assert (tiny.vocab_size, tiny.seq_len, tiny.width, tiny.heads, tiny.layers, tiny.freq_dim) == (K, 64, 64, 4, 8, 64)
    assert (debug.width, debug.heads, debug.layers, debug.seq_len, debug.freq_dim) == (32, 2, 4, 32, 32)
    assert tiny.mlp_ratio == 4.0 and tiny.mixed is False
    assert ar_config("tiny", mixed=True, layers=None).mixed is True
    for key, value in [("heads", 5), ("layers", 0), ("seq_len", 0), ("freq_dim", 7), ("mlp_ratio", 0.0)]:
        with pytest.raises(ValueError, match=f"model.{key}"):
            ar_config("debug", **{key: value})
    with pytest.raises(ValueError, match="model.patch"):
        ar_config("debug", patch=2)
    with pytest.raises(ValueError, match="model.size"):
        ar_config("small")


# ---- the Block-Diffusion mask -----------------------------------------------------------------
def test_attention_mask_closed_form():
    """Rows = queries [x0 x1 x2 | z0 z1 z2], columns = keys; z_i predicts y_i = x_{i+1}."""
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 0, 0],  # z0 sees x0 (never x1, the clean copy of its target) and itself
            [1, 1, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(ar_attention_mask(3, 3), expected)
    # A noisy suffix (decoding): the last noisy query's row and keys are the same.
    keep = [0, 1, 2, 5]
    assert torch.equal(ar_attention_mask(3, 1), expected[keep][:, keep])
    with pytest.raises(ValueError):
        ar_attention_mask(3, 4)


def _logits(net, x, z, sigma):
    with torch.no_grad():
        return net(x, z, sigma)


def test_noisy_output_i_sees_exactly_the_clean_past_and_clean_outputs_are_causal():
    """Perturb clean x_j: noisy logits i (and the clean stream's next-token logits i) change iff j <= i.
    In particular x_{i+1}, the clean copy of noisy token i's target, is invisible to it (exactly)."""
    cfg = ar_config("debug", mixed=True)
    torch.manual_seed(0)
    net = _perturbed(build_ar(cfg, _spec(), baseline=False, seed=0))
    assert net.next_head is not None
    t, n = 8, 3
    x = torch.randint(0, K, (n, t), generator=torch.Generator().manual_seed(1))
    z = torch.randn(n, t, cfg.width, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.01, 0.5, 20.0])
    base, base_next = _logits(net, x, z, sigma)
    seen = torch.zeros(t, t, dtype=torch.bool)  # seen[i, j]: noisy output i depends on clean x_j
    seen_next = torch.zeros(t, t, dtype=torch.bool)
    for j in range(t):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1 + torch.arange(n)) % K
        out, out_next = _logits(net, x2, z, sigma)
        for i in range(t):
            for got, ref, table in ((out, base, seen), (out_next, base_next, seen_next)):
                if torch.equal(got[:, i], ref[:, i]):
                    continue
                assert (got[:, i] - ref[:, i]).abs().max() > 1e-3, (i, j)  # a real change, not rounding
                table[i, j] = True
    causal = torch.ones(t, t).tril().bool()
    assert torch.equal(seen, causal)
    assert torch.equal(seen_next, causal)


def test_noisy_token_sees_no_other_noisy_token_and_clean_tokens_see_none():
    cfg = ar_config("debug", mixed=True)
    torch.manual_seed(0)
    net = _perturbed(build_ar(cfg, _spec(), baseline=False, seed=0))
    t, n = 6, 2
    x = torch.randint(0, K, (n, t), generator=torch.Generator().manual_seed(3))
    z = torch.randn(n, t, cfg.width, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.05, 3.0])
    base, base_next = _logits(net, x, z, sigma)
    for k in range(t):
        z2 = z.clone()
        z2[:, k] += torch.randn(n, cfg.width, generator=torch.Generator().manual_seed(5 + k))
        out, out_next = _logits(net, x, z2, sigma)
        assert torch.equal(out_next, base_next)  # the clean stream never reads the noisy one
        for i in range(t):
            if i == k:
                assert (out[:, i] - base[:, i]).abs().max() > 1e-3
            else:
                assert torch.equal(out[:, i], base[:, i]), (i, k)


@pytest.mark.parametrize("m", [1, 3])
def test_a_noisy_suffix_gives_the_same_logits_as_the_full_noisy_stream(m):
    """Decoding feeds only the last noisy token; teacher forcing feeds all T: the same logits."""
    cfg = ar_config("debug")
    torch.manual_seed(0)
    net = _perturbed(build_ar(cfg, _spec(), baseline=False, seed=0))
    x = torch.randint(0, K, (4, 10), generator=torch.Generator().manual_seed(6))
    z = torch.randn(4, 10, cfg.width, generator=torch.Generator().manual_seed(7))
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0])
    full, _ = _logits(net, x, z, sigma)
    suffix, _ = _logits(net, x, z[:, -m:], sigma)
    torch.testing.assert_close(suffix, full[:, -m:], rtol=0, atol=1e-5)


def test_with_the_residual_branch_silenced_the_head_reads_the_skip_path_c_skip_z():
    """Zero layers' gates (init), zero noisy projection and positions: h_i = 0, so the head reads
    u_i = c_out h_i + c_skip z_i = c_skip z_i and (final adaLN zero) logits = head(LN(c_skip z_i))."""
    cfg = ar_config("debug")
    torch.manual_seed(0)
    net = build_ar(cfg, _spec(), baseline=False, seed=0).eval()
    with torch.no_grad():
        for p in (net.noisy_in.weight, net.noisy_in.bias, net.pos_embed):
            p.zero_()
        net.head.weight.normal_()
        net.head.bias.normal_()
    z = torch.randn(3, 5, cfg.width, generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, K, (3, 5), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.002, 0.3, 2.0])
    logits, _ = _logits(net, x, z, sigma)
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    expected = net.head(F.layer_norm(c_skip[:, None, None] * z, (cfg.width,), eps=1e-6))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


# ---- the loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixed", [False, True])
def test_ar_loss_at_init_is_w_times_ln_k(mixed):
    """Zero heads: uniform logits, CE = ln 84 at every position, so loss = w(sigma) ln 84 (+ ln 84 mixed)."""
    cfg = ar_config("debug", mixed=mixed)
    net = build_ar(cfg, _spec(), baseline=False, seed=0)
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 80.0])
    loss = ar_loss(net, (_windows(5, cfg.seq_len),), sigma, torch.Generator().manual_seed(0), SIGMA_DATA)
    expected = _w(sigma) * LN_K + (LN_K if mixed else 0.0)
    assert loss.shape == (5,)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mixed", [False, True])
def test_ar_loss_is_w_times_next_token_ce_by_hand(mixed):
    """Replay the generator: z = E[y] + sigma eps for the NEXT tokens y = tokens[:, 1:], the clean
    input is tokens[:, :-1], and the loss is w(sigma) mean_i -log softmax(logits_i)[y_i] (+ plain CE)."""
    cfg = ar_config("debug", mixed=mixed)
    torch.manual_seed(0)
    net = _perturbed(build_ar(cfg, _spec(), baseline=False, seed=0)).train()
    seen = {}
    net.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].clone(), z=args[1].detach().clone()))
    tokens = _windows(6, cfg.seq_len, seed=1)
    sigma = torch.tensor([0.002, 0.02, 0.2, 2.0, 20.0, 80.0])
    loss = ar_loss(net, (tokens,), sigma, torch.Generator().manual_seed(9), SIGMA_DATA)
    x, y = tokens[:, :-1], tokens[:, 1:]
    table = net.target_table
    eps = torch.randn(6, cfg.seq_len, cfg.width, generator=torch.Generator().manual_seed(9))
    assert torch.equal(seen["x"], x)
    torch.testing.assert_close(seen["z"], table[y] + sigma[:, None, None] * eps, rtol=0, atol=1e-6)
    with torch.no_grad():
        logits, next_logits = net(x, seen["z"], sigma, SIGMA_DATA)
    nll = -logits.double().log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)  # (N, T)
    expected = _w(sigma) * nll.mean(1)
    if mixed:
        expected = expected + (-next_logits.double().log_softmax(-1).gather(-1, y[..., None])).squeeze(-1).mean(1)
    torch.testing.assert_close(loss.detach().double(), expected, rtol=1e-4, atol=0)


def test_ar_loss_is_deterministic_given_the_generator():
    cfg = ar_config("debug")
    torch.manual_seed(0)
    net = _perturbed(build_ar(cfg, _spec(), baseline=False, seed=0))
    batch, sigma = (_windows(4, cfg.seq_len),), torch.tensor([0.01, 0.1, 1.0, 10.0])
    a, b, c = (ar_loss(net, batch, sigma, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_baseline_loss_is_plain_next_token_ce_and_ignores_sigma():
    cfg = ar_config("debug")
    torch.manual_seed(0)
    net = build_ar(cfg, _spec(num_layers=cfg.layers), baseline=True, seed=0)
    tokens = _windows(3, cfg.seq_len)
    g = torch.Generator().manual_seed(0)
    at_init = ar_baseline_loss(net, (tokens,), torch.ones(3), g)
    torch.testing.assert_close(at_init.double(), torch.full((3,), LN_K, dtype=torch.float64), rtol=1e-6, atol=0)
    _perturbed(net)
    a = ar_baseline_loss(net, (tokens,), torch.full((3,), 0.002), g)
    b = ar_baseline_loss(net, (tokens,), torch.full((3,), 80.0), g)
    expected = F.cross_entropy(net(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, expected, rtol=1e-6, atol=0)


def test_baseline_is_causal():
    cfg = ar_config("debug")
    torch.manual_seed(0)
    net = _perturbed(build_ar(cfg, _spec(num_layers=cfg.layers), baseline=True, seed=0))
    assert isinstance(net, ARBaseline) and len(net.layers) == cfg.layers
    x = torch.randint(0, K, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = net(x)
        for j in range(7):
            x2 = x.clone()
            x2[:, j] = (x2[:, j] + 1) % K
            out = net(x2)
            for i in range(7):
                same = torch.equal(out[:, i], base[:, i])
                assert same == (i < j), (i, j)


# ---- denoiser and decoding -----------------------------------------------------------------------
def test_denoiser_at_init_is_the_mean_target_embedding():
    """Zero head: softmax is uniform, so D(z, sigma) = mean of E's rows for any z, sigma."""
    cfg = ar_config("debug")
    net = build_ar(cfg, _spec(), baseline=False, seed=0)
    d = ar_denoiser(net)
    z = 5 * torch.randn(3, 4, cfg.width)
    out = d(z, torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64), context=torch.zeros(3, 6, dtype=torch.long))
    assert out.shape == z.shape
    torch.testing.assert_close(out, net.target_table.mean(0).expand_as(z), rtol=0, atol=1e-6)
    assert d.last_logits.shape == (3, 4, K)


def _hand_chain(nets, ctx, z):
    """design.md 1.4 written out: grid point j (equally spaced in the truncated CDF) lies in block j;
    z <- z + (s_next - s)(z - D)/s with D = softmax(logits) @ E; return the final (sigma_min) logits."""
    b = len(nets)
    q_min, q_max = (PHI.cdf((math.log(s) - P_MEAN) / P_STD) for s in (SIGMA_MIN, SIGMA_MAX))
    f = [(b - 1 - j) / (b - 1) for j in range(b)]
    grid = [math.exp(P_MEAN + P_STD * PHI.inv_cdf(q_min + fj * (q_max - q_min))) for fj in f]
    grid[0], grid[-1] = SIGMA_MAX, SIGMA_MIN
    with torch.no_grad():
        for j in range(b):
            sigma = torch.full((z.shape[0],), grid[j])
            logits, _ = nets[j](ctx, z, sigma)
            if j < b - 1:
                d = logits.softmax(-1) @ nets[j].target_table
                z = z + (grid[j + 1] - grid[j]) * (z - d) / grid[j]
    return logits


def _count_calls(nets):
    calls = [0] * len(nets)
    for b, net in enumerate(nets):
        net.register_forward_pre_hook(lambda mod, args, b=b: calls.__setitem__(b, calls[b] + 1))
    return calls


def test_decoding_calls_each_block_once_per_token_and_matches_a_hand_written_chain():
    cfg = ar_config("debug")
    nets, plan = _blocks(cfg, 4)
    calls = _count_calls(nets)
    prompt = "ROMEO:\n"
    text = generate_ar(nets, plan, LEVELS, prompt, 5, baseline=False, seed=3)
    assert calls == [5, 5, 5, 5]
    assert text.startswith(prompt) and len(text) == len(prompt) + 5 and set(text) <= set(VOCAB)
    # The first generated character, by hand from the same seeded noise.
    z = SIGMA_MAX * torch.randn(1, 1, cfg.width, generator=torch.Generator().manual_seed(3))
    logits = _hand_chain(nets, encode(prompt)[None], z)
    assert text[len(prompt)] == VOCAB[int(logits[0, -1].argmax())]
    assert generate_ar(nets, plan, LEVELS, prompt, 5, baseline=False, seed=3) == text  # deterministic


def test_decoding_crops_the_context_to_seq_len_and_the_baseline_decodes_greedily():
    cfg = ar_config("debug")
    nets, plan = _blocks(cfg, 2)
    prompt = TEXT[: cfg.seq_len + 9]  # longer than the position table
    text = generate_ar(nets, plan, LEVELS, prompt, 3, baseline=False, seed=0)
    assert len(text) == len(prompt) + 3
    torch.manual_seed(0)
    lm = _perturbed(build_ar(cfg, _spec(num_layers=cfg.layers), baseline=True, seed=0))
    calls = _count_calls([lm])
    out = generate_ar([lm], [_spec(num_layers=cfg.layers)], LEVELS, prompt, 4, baseline=True, seed=0)
    assert calls == [4]
    ids = encode(out)
    with torch.no_grad():  # each new character is the argmax given the last seq_len characters
        for k in range(len(prompt), len(out)):
            assert int(lm(ids[max(0, k - cfg.seq_len) : k][None])[0, -1].argmax()) == int(ids[k])
    with pytest.raises(ValueError, match="prompt"):
        generate_ar(nets, plan, LEVELS, "", 1, baseline=False)


# ---- evaluation ----------------------------------------------------------------------------------
def _split(cfg, n: int = 6) -> TextSplit:
    w = _windows(n, cfg.seq_len, seed=2)
    return TextSplit(train=w, val=w, test=w)


def test_evaluate_at_init_has_closed_form_metrics():
    """Zero heads: every CE is ln 84 and the argmax is token 0 ('\\n'): accuracy = share of y == 0."""
    cfg = ar_config("debug", mixed=True)
    nets, plan = _blocks(cfg, 2, perturb=False)
    split = _split(cfg)
    m = evaluate_ar(nets, plan, split, LEVELS, baseline=False, windows=4, batch_size=3, sample_chars=3)
    assert set(m) == {"val_ce", "val_ce_sigma_max", "val_accuracy", "val_ce_next_head", "sample_text"}
    for key in ("val_ce", "val_ce_sigma_max", "val_ce_next_head"):
        assert m[key] == pytest.approx(LN_K, rel=1e-6)
    assert m["val_accuracy"] == pytest.approx((split.val[:4, 1:] == 0).double().mean().item(), abs=1e-12)
    assert m["sample_text"] == split.prompt + "\n" * 3  # greedy from the first validation characters
    lm = build_ar(cfg, _spec(num_layers=cfg.layers), baseline=True, seed=0)
    mb = evaluate_ar([lm], [_spec(num_layers=cfg.layers)], split, LEVELS, baseline=True, windows=4, sample_chars=2)
    assert set(mb) == {"val_ce", "val_accuracy", "sample_text"} and mb["val_ce"] == pytest.approx(LN_K, rel=1e-6)


def test_evaluate_val_ce_is_the_final_logits_of_the_teacher_forced_chain():
    """All positions in parallel from z0 = sigma_max * randn(W, T, width) (seeded), batched or not."""
    cfg = ar_config("debug")
    nets, plan = _blocks(cfg, 2)
    split = _split(cfg, 3)
    m = evaluate_ar(nets, plan, split, LEVELS, baseline=False, seed=5, windows=3, batch_size=2, sample_chars=1)
    x, y = split.val[:, :-1], split.val[:, 1:]
    z0 = SIGMA_MAX * torch.randn(3, cfg.seq_len, cfg.width, generator=torch.Generator().manual_seed(5))
    logits = _hand_chain(nets, x, z0)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert m["val_ce"] == pytest.approx(ce, rel=1e-4)
    assert m["val_accuracy"] == pytest.approx((logits.argmax(-1) == y).double().mean().item(), abs=1e-9)
    with torch.no_grad():
        first, _ = nets[0](x, z0, torch.full((3,), SIGMA_MAX))
    assert m["val_ce_sigma_max"] == pytest.approx(F.cross_entropy(first.flatten(0, 1), y.flatten()).item(), rel=1e-4)


# ---- ownership: mixed head, parameters, fixed table ------------------------------------------------
def _block_params_closed_form(cfg, num_layers: int, next_head: bool) -> int:
    d, k, f, h = cfg.width, cfg.vocab_size, cfg.freq_dim, int(cfg.width * cfg.mlp_ratio)
    layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h + h * d + d) + (d * 6 * d + 6 * d)
    embed = k * d + cfg.seq_len * d + (d * d + d) + (f * d + d + d * d + d)  # tokens, positions, noisy_in, sigma
    head = (d * 2 * d + 2 * d) + (d * k + k)
    return num_layers * layer + embed + head + ((2 * d + d * k + k) if next_head else 0)


@pytest.mark.parametrize("num_blocks", [1, 2, 4])
def test_mixed_head_only_on_the_lowest_noise_block_and_parameter_counts(num_blocks):
    cfg = ar_config("debug")
    plan = make_plan(LEVELS, num_blocks, cfg.layers)
    for mixed in (False, True):
        c = ar_config("debug", mixed=mixed)
        for spec in plan:
            net = build_ar(c, spec, baseline=False, seed=0)
            has = mixed and spec.index == num_blocks - 1
            assert (net.next_head is not None) == has
            assert len(net.layers) == cfg.layers // num_blocks
            assert _count(net.parameters()) == _block_params_closed_form(c, spec.num_layers, has)


def test_blocks_own_disjoint_parameters_and_each_gets_its_own_gradients():
    cfg = ar_config("debug", mixed=True)
    nets, plan = _blocks(cfg, 2, perturb=False)
    ptrs = [{p.data_ptr() for p in n.parameters()} for n in nets]
    assert all(len(p) == len(list(n.parameters())) for p, n in zip(ptrs, nets))
    assert not ptrs[0] & ptrs[1]
    for n in nets:
        n.train()
    tokens = _windows(4, cfg.seq_len)
    loss = ar_loss(nets[1], (tokens,), torch.full((4,), 0.01), torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert all(p.grad is not None for p in nets[1].parameters())  # no dead parameter in the block
    assert all(p.grad is None for p in nets[0].parameters())  # nothing flows to the other block


def test_the_target_table_is_the_fixed_run_seed_table_and_never_trained():
    cfg = ar_config("debug")
    plan = make_plan(LEVELS, 2, cfg.layers, gamma=0.1)
    with seeded(1):
        a = build_ar(cfg, plan[0], baseline=False, seed=7)
    with seeded(2):
        b = build_ar(cfg, plan[1], baseline=False, seed=7)
    c = build_ar(cfg, plan[0], baseline=False, seed=8)
    expected = fixed_embedding(K, cfg.width, 7)
    assert torch.equal(a.target_table, expected) and torch.equal(b.target_table, expected)
    assert not torch.equal(c.target_table, expected)
    torch.testing.assert_close(expected.norm(dim=1), torch.ones(K), rtol=0, atol=1e-6)
    assert "target_table" in a.state_dict()  # persistent: exported weights are self-contained
    assert "target_table" not in dict(a.named_parameters())
    assert not torch.equal(a.tok_embed.weight, b.tok_embed.weight)  # weights come from the init seed
    train = TrainConfig(batch_size=4, lr=1e-2, warmup_samples=0)
    trainer = BlockTrainer(a, plan[0], ar_loss, train, LEVELS, seed=7)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    trainer.step((_windows(4, cfg.seq_len),))
    assert torch.equal(a.target_table, expected)
    assert not torch.equal(a.head.weight, before["head.weight"])  # the step did train the block


# ---- smoke training --------------------------------------------------------------------------------
def test_short_training_lowers_the_block_and_baseline_losses():
    cfg = ar_config("debug", seq_len=16)
    plan = make_plan(LEVELS, 4, cfg.layers, gamma=0.1)
    train = TrainConfig(batch_size=16, lr=3e-3, warmup_samples=0)
    held = (_windows(32, cfg.seq_len, seed=99),)
    sigma = torch.exp(torch.linspace(math.log(plan[0].lo), math.log(SIGMA_MAX), 32))

    def held_loss(net, loss_fn):
        with torch.no_grad():
            return loss_fn(net.eval(), held, sigma, torch.Generator().manual_seed(0)).mean().item()

    e2e = _spec(num_layers=cfg.layers)
    for spec, baseline, loss_fn in ((plan[0], False, ar_loss), (e2e, True, ar_baseline_loss)):
        with seeded(0):
            net = build_ar(cfg, spec, baseline=baseline, seed=0)
        start = held_loss(net, loss_fn)
        trainer = BlockTrainer(net, spec, loss_fn, train, LEVELS, seed=0)
        for step in range(60):
            trainer.step((_windows(16, cfg.seq_len, seed=step),))
        end = held_loss(net, loss_fn)
        assert end < 0.8 * start, (baseline, start, end)
