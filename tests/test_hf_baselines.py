"""The field's models from transformers (newllm/models/hf_baselines.py): the wrapper is the library's model,
causal, sized like the other baselines, and its state counted as the library's own cache holds it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from newllm import keys
from newllm.analysis.runs import generate_text
from newllm.errors import ConfigError, GenerationError
from newllm.models import build_model, count_parameters
from newllm.models.hf_baselines import FAMILIES, HFLM, float_tensors
from newllm.models.sampling import sample_token
from newllm.models.sizing import compose_model, params_of, solve_core_params, solve_state_floats, state_of
from tests.conftest import REPO

FAMILY_NAMES = sorted(FAMILIES)
V = 50
# Building an RwkvModel asks once per process whether `ninja` runs (`ninja --version`, lru_cached: its CUDA kernel
# loader). Asked here, at collection, so the fast tier's no-process guard sees no process in the tests themselves.
transformers.utils.import_utils.is_ninja_available()


def tiny(family: str, **kw) -> HFLM:
    torch.manual_seed(0)
    return HFLM(V, family, kw.pop("layers", 2), kw.pop("context_dim", 32), embed_dim=0, **kw).eval()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_contexts_and_logits_are_the_library_models_own_on_the_same_weights(family):
    """contexts_window is the library backbone's last hidden state; head(contexts) is the library's *ForCausalLM
    logits, but for the logit soft cap that recurrent_gemma's and xlstm's LM classes add (30 tanh(z / 30))."""
    model = tiny(family)
    ids = torch.randint(0, V, (2, 19))
    backbone = getattr(transformers, FAMILIES[family].backbone)(model.config).eval()
    backbone.load_state_dict(model.backbone.state_dict())
    lm = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    lm.base_model.load_state_dict(model.backbone.state_dict())
    lm.get_output_embeddings().weight.data.copy_(model.head.weight)
    with torch.no_grad():
        contexts = model.contexts_window(ids)
        assert contexts.shape == (2, 19, 32)
        torch.testing.assert_close(contexts, backbone(input_ids=ids, use_cache=False).last_hidden_state)
        ours, theirs = model(ids), lm(input_ids=ids, use_cache=False).logits
    cap = {"recurrent_gemma": "logits_soft_cap", "xlstm": "output_logit_soft_cap"}.get(family)
    cap = None if cap is None else getattr(model.config, cap)
    torch.testing.assert_close(theirs, ours if cap is None else cap * torch.tanh(ours / cap))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_later_token_changes_no_earlier_context(family):
    model = tiny(family, layers=3)  # recurrent_gemma's third block is its local attention
    ids = torch.randint(0, V, (2, 21))
    changed = ids.clone()
    changed[:, 13] = (changed[:, 13] + 1) % V
    with torch.no_grad():
        a, b = model.contexts_window(ids), model.contexts_window(changed)
    assert torch.equal(a[:, :13], b[:, :13])
    assert (a[:, 13:] - b[:, 13:]).abs().amax() > 1e-4  # ... and does change its own and later ones


def test_library_initialisation_and_a_head_tied_where_the_family_ties_it():
    mamba, llama = tiny("mamba"), tiny("llama")
    assert mamba.head.weight is mamba.backbone.get_input_embeddings().weight  # MambaConfig ties, as MambaForCausalLM
    assert count_parameters(mamba)["params_head"] == 0
    assert llama.head.weight is not llama.backbone.get_input_embeddings().weight
    # LlamaPreTrainedModel._init_weights: N(0, initializer_range = 0.02) for the head, as LlamaForCausalLM's
    assert abs(float(llama.head.weight.std()) - 0.02) < 0.002
    assert llama.backbone.get_input_embeddings().padding_idx is None  # no library special token: every row trains
    assert mamba.backbone.get_input_embeddings().padding_idx is None


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("budget", [50_000, 150_000])
def test_core_params_budget_is_met_within_two_percent(family, budget):
    model_cfg, _ = compose_model([f"model={family}", f"model.core_params={budget}"])
    solved = solve_core_params(model_cfg, budget)
    assert abs(params_of(solved) - budget) <= 0.02 * budget
    assert solved.context_dim % FAMILIES[family].width_step(model_cfg.heads, model_cfg.expand) == 0


# Hand counts for layers=2, context_dim=32, heads=4, state_size=16, expand=2, conv_kernel=4, after 10 tokens.
HAND_COUNTED = {
    "llama": 2 * 2 * 10 * 32,  # keys and values: layers x tokens x (4 heads x 8)
    "mamba": 2 * 64 * (16 + 4),  # per layer: SSM state 64 x 16, conv state 64 x 4 (inner width 2 x 32)
    "mamba2": 2 * (4 * 16 * 16 + (64 + 2 * 16) * 4),  # SSM 4 heads x 16 x 16; conv over x, B, C: 96 x 4
    "rwkv": 2 * 5 * 32,  # five vectors of 32 per layer
    "recurrent_gemma": 2 * 32 * 4,  # two recurrent blocks: RG-LRU 32 + conv 32 x 3
    "xlstm": 2 * 4 * (4 * 8 + 4 + 1),  # per block and head: C 4 x 8 (qk = 16 / 4, v = 32 / 4), n 4, m 1
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_state_floats_match_a_hand_count(family):
    assert tiny(family).state_floats(10) == HAND_COUNTED[family]


def test_state_floats_of_attention_grow_with_length_and_recurrent_states_do_not():
    assert tiny("llama").state_floats(20) == 2 * tiny("llama").state_floats(10)
    for family in ("mamba", "mamba2", "rwkv", "xlstm"):
        assert tiny(family).state_floats(1000) == tiny(family).state_floats(10)
    griffin = tiny("recurrent_gemma", layers=3, attention_window=16)  # recurrent, recurrent, local attention
    assert griffin.state_floats(10) == 2 * 32 * 4 + 2 * 10 * 32
    # the window caps it: the library's sliding-window cache keeps the last attention_window - 1 positions
    assert griffin.state_floats(40) == griffin.state_floats(1000) == 2 * 32 * 4 + 2 * 15 * 32


@pytest.mark.parametrize("family", ["llama", "mamba", "mamba2", "rwkv"])
def test_state_floats_are_what_the_librarys_own_cache_holds(family):
    model = tiny(family)
    with torch.no_grad():
        out = model.backbone(input_ids=torch.randint(0, V, (1, 10)), use_cache=True)
    cache = out.get("cache") if family != "rwkv" else out.state
    assert sum(t.numel() for t in float_tensors(cache)) == model.state_floats(10)


# ----------------------------------------------------------------------------- generation with the library's cache
PROMPT = torch.tensor([3, 14, 15, 9])
# recurrent_gemma's third block is its local attention; with a window of 8 its cache is full (7 positions) before
# 8 tokens are made
GEN_KW = {"recurrent_gemma": {"layers": 3, "attention_window": 8}}


def carried_floats_while_decoding(model: HFLM, counts: tuple[int, ...]) -> dict[int, int]:
    """Floats of every tensor the decoding carries after each of `counts` generated tokens (greedy steps)."""
    dec, seen = model.new_decoding(), {}
    with torch.no_grad():
        logits = model.step(PROMPT.view(1, -1), dec)
        for i in range(1, max(counts) + 1):
            logits = model.step(logits.argmax(-1, keepdim=True), dec)
            if i in counts:
                seen[i] = sum(t.numel() for t in model.state_tensors(dec))
    return seen


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generation_state_is_constant_for_the_recurrent_families_and_grows_linearly_for_llama(family):
    model = tiny(family, **GEN_KW.get(family, {}))
    carried = carried_floats_while_decoding(model, (8, 64))
    p = PROMPT.numel()
    # what the library's caches hold after L tokens is state_floats(L), the count every run records
    assert carried == {8: model.state_floats(p + 8), 64: model.state_floats(p + 64)}
    if family == "llama":  # keys and values of every position: 2 layers x 2 x 32 floats more per token
        assert carried[64] - carried[8] == 56 * 2 * 2 * 32
    elif family == "recurrent_gemma":  # two recurrent blocks + the window's 7 positions of one attention block
        assert carried[64] == carried[8] == 2 * 32 * 4 + 2 * 7 * 32
    else:  # the same config as the hand counts
        assert carried[64] == carried[8] == HAND_COUNTED[family]


def no_cache_decode(model: HFLM, n: int, pick) -> torch.Tensor:
    """n tokens after PROMPT, the whole prefix recomputed by the plain forward (no cache) at every step."""
    ids = PROMPT.clone()
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, torch.tensor([pick(model(ids.view(1, -1))[0, -1])])])
    return ids[PROMPT.numel():]


# xlstm at C=32 steps a cache re-shaped to its layers (transformers 5.25 sizes xLSTMCache by widths rounded up to
# 64); at C=128 the library's cache is used as it comes. A two-layer Griffin has no attention block (no mask built).
CACHE_CASES = [(f, GEN_KW.get(f, {})) for f in FAMILY_NAMES] + [
    ("xlstm", {"context_dim": 128}), ("recurrent_gemma", {"layers": 2})]


@pytest.mark.parametrize(("family", "kw"), CACHE_CASES, ids=lambda x: "-".join(f"{k}{v}" for k, v in x.items())
                         if isinstance(x, dict) else x)
def test_cached_generation_makes_the_tokens_a_no_cache_decode_makes(family, kw):
    model = tiny(family, **kw)
    n = 24  # past recurrent_gemma's window of 8
    greedy = model.generate(PROMPT, n, top_k=1)
    assert torch.equal(greedy, no_cache_decode(model, n, lambda z: int(z.argmax())))
    # sampled at temperature 1 (tokens vary even where an untrained model's argmax repeats): the same draws
    sampled = model.generate(PROMPT, n, temperature=1.0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(sampled, no_cache_decode(model, n, lambda z: sample_token(z, 1.0, 0, g)))
    assert sampled.unique().numel() > 3


def test_generation_refusals_are_one_line():
    model = tiny("mamba")
    with pytest.raises(GenerationError, match=r"^generate\(prompt, n\): the prompt must hold at least one token$"):
        model.generate(torch.tensor([], dtype=torch.long), 4)
    with pytest.raises(GenerationError, match=r"^generate: top_k=0 is not allowed: expected an integer >= 1"):
        model.generate(PROMPT, 4, top_k=0)
    with pytest.raises(GenerationError, match=r"^generate: need prompt \+ n = 21 <= model.max_len=20$"):
        tiny("llama", max_len=20).generate(PROMPT, 17)


def test_state_floats_budget_sizes_the_width_known_answers():
    # mamba (layers 2, expand 2, state 16, conv 4) carries 2 x 2C x (16 + 4) = 80 C floats: 8000 -> C = 100
    mamba, _ = compose_model(["model=mamba", "model.state_floats=8000"])
    assert solve_state_floats(mamba, 8000, 64).context_dim == 100
    # the GRU carries layers x C: 2 x 128
    gru, _ = compose_model(["model=gru", "model.state_floats=256"])
    assert solve_state_floats(gru, 256, 64).context_dim == 128
    # llama's KV cache at 64 tokens: 2 x 2 x 64 x C, C a multiple of 8 -> C = 48 for 12288
    llama, _ = compose_model(["model=llama", "model.state_floats=12288"])
    solved = solve_state_floats(llama, 12288, 64)
    assert (solved.context_dim, state_of(solved, 64)) == (48, 12288)


def test_a_state_budget_no_width_reaches_is_one_line():
    llama, _ = compose_model(["model=llama", "model.state_floats=5000"])
    with pytest.raises(ConfigError) as err:  # 2 x 2 x 64 x C steps by 2048 floats (C by 8)
        solve_state_floats(llama, 5000, 64)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.state_floats=5000 is not allowed for this model")
    assert "widths step by 8" in msg


def test_sizing_by_parameters_and_by_state_at_once_is_refused():
    with pytest.raises(ConfigError, match=r"^model.state_floats=4000 is not allowed: expected null with "
                                          r"model.core_params=50000"):
        compose_model(["model=mamba", "model.core_params=50000", "model.state_floats=4000"])


def test_a_width_the_familys_shapes_cannot_divide_is_one_line():
    with pytest.raises(ConfigError, match=r"^model.context_dim=36 is not allowed: expected a multiple of 8 for "
                                          r"model=llama \(model.heads=4"):
        compose_model(["model=llama", "model.context_dim=36"])


def test_the_kernel_on_cpu_is_the_librarys_reference_path():
    cpu = torch.device("cpu")
    assert {f: tiny(f).kernel(cpu) for f in FAMILY_NAMES} == {
        "llama": "sdpa", "mamba": "mambapy", "mamba2": "reference", "rwkv": "reference",
        "recurrent_gemma": "reference", "xlstm": "reference"}


def test_mambas_parallel_scan_is_its_per_token_scan_within_float_tolerance():
    """use_mambapy only trades speed: logits and every gradient equal the library's per-token loop's, on a
    length that is not a power of two (mamba.py pads to one)."""
    fast = tiny("mamba")
    slow = tiny("mamba", options={"use_mambapy": False})
    slow.load_state_dict(fast.state_dict())
    assert (fast.kernel(torch.device("cpu")), slow.kernel(torch.device("cpu"))) == ("mambapy", "reference")
    ids = torch.randint(0, V, (3, 23), generator=torch.Generator().manual_seed(1))
    losses = [m(ids).logsumexp(-1).mean() for m in (fast, slow)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(loss, list(m.parameters())) for loss, m in zip(losses, (fast, slow), strict=True)]
    for (name, _), g, h in zip(fast.named_parameters(), *grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6, msg=name)


def test_built_from_conf_like_every_model():
    model_cfg, vocab = compose_model(["model=mamba2", "model.context_dim=48"])
    with torch.device("meta"):
        model = build_model(model_cfg, vocab)
    assert isinstance(model, HFLM) and model.config.hidden_size == 48 and model.config.vocab_size == vocab


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_quick_run_end_to_end(family, tiny_run):
    run_dir, _ = tiny_run(f"hf_{family}", f"model={family}", "model.context_dim=16")
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m[keys.MODEL_KERNEL] == {"llama": "sdpa", "mamba": "mambapy"}.get(family, "reference")
    assert m[keys.MODEL_STATE_FLOATS] == tiny(family, context_dim=16).state_floats(32)  # training=quick: T 32
    assert m[keys.P2_VAL_PPL] < m[keys.P2_UNIFORM_PPL]  # it learned something in its few steps
    assert keys.P1_ITERATIONS not in m  # no Phase 1: a baseline
    # the trained run samples through newllm's own path (generate_text -> HFLM.generate), seeded
    text = generate_text(run_dir, "hello", n=6, seed=1)
    assert text and text == generate_text(run_dir, "hello", n=6, seed=1)


# ----------------------------------------------------------------------------- the comparison presets
@pytest.mark.slow  # ~8 s each: ten width solves per preset; the fast tier stays under a minute
@pytest.mark.parametrize("preset", ["compare_models_sota", "compare_models_sota_quick"])
def test_compare_models_sota_has_a_study_per_family_and_each_reaches_the_budget(preset):
    import newllm.run  # noqa: F401 -- registers the sweeper's schema

    with initialize_config_dir(config_dir=str(REPO / "conf")):
        sweep = compose("config", [f"+sweep={preset}"], return_hydra_config=True)
        studies = sweep.hydra.sweeper.studies
        assert set(studies) == {"sequential", "layerwise", "gru", "transformer", *FAMILY_NAMES}
        budget = sweep.model.core_params
        for name, study in studies.items():
            model_cfg = compose("config", [f"+sweep={preset}", *study.overrides]).model
            assert abs(params_of(solve_core_params(model_cfg, budget)) - budget) <= 0.02 * budget, name
