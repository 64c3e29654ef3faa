"""Zero-shot scoring: prompts as the harness's YAML writes them, log-likelihoods against a naive
unbatched computation, the metrics, and bad input."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from pare.errors import ConfigError, DataNotFoundError
from pare.eval.zeroshot import TASKS, LoglikelihoodRunner, encode_pair, evaluate_tasks, requests_of, resolve_tasks
from pare.eval.zeroshot import data as zs_data
from pare.eval.zeroshot.loglik import Encoded, harness_max_length, tok_encode
from pare.eval.zeroshot.score import aggregate, doc_metrics, mean_stderr
from tiny import tiny_model, tiny_tokenizer
from tiny_zeroshot import write_zeroshot_dir


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny forwards: one thread (two threads spin-wait on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    root = write_zeroshot_dir(tmp_path / "data")
    monkeypatch.setenv("PARE_DATA_DIR", str(root))
    return root


# -- prompts: the harness's YAML, written out by hand --------------------------------------------


def test_prompts_of_hub_rows_match_the_harness_yaml() -> None:
    piqa = TASKS["piqa"].from_hub({"goal": "Open a jar", "sol1": "twist the lid ", "sol2": "hit it", "label": 1})
    assert requests_of(TASKS["piqa"], piqa) == [("Question: Open a jar\nAnswer:", " twist the lid "),
                                                ("Question: Open a jar\nAnswer:", " hit it")]
    assert piqa["gold"] == 1
    arc = TASKS["arc_easy"].from_hub({"question": "Which is a gas?", "answerKey": "2",
                                      "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]}})
    assert requests_of(TASKS["arc_easy"], arc)[1] == ("Question: Which is a gas?\nAnswer:", " steam")
    assert arc["gold"] == 1 and len(arc["choices"]) == 3  # numeric labels looked up as-is; 3 choices kept
    obqa = TASKS["openbookqa"].from_hub({"question_stem": "The sun is", "answerKey": " C",
                                        "choices": {"text": ["cold", "a star", "hot"], "label": ["A", "B", "C"]}})
    assert requests_of(TASKS["openbookqa"], obqa)[0] == ("The sun is", " cold") and obqa["gold"] == 2
    boolq = TASKS["boolq"].from_hub({"passage": "Ethanol fuel -- Ethanol is made.", "question": "is ethanol made",
                                     "label": 1})
    assert requests_of(TASKS["boolq"], boolq) == [
        ("Ethanol fuel -- Ethanol is made.\nQuestion: is ethanol made?\nAnswer:", " no"),
        ("Ethanol fuel -- Ethanol is made.\nQuestion: is ethanol made?\nAnswer:", " yes")]
    assert boolq["gold"] == 1 and TASKS["boolq"].from_hub({**boolq, "passage": "", "question": "",
                                                           "label": "false"})["gold"] == 0
    hs = TASKS["hellaswag"].from_hub({
        "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
        "endings": ["is using wrap to wrap a pair of skis.", " starts pulling up roofing [title] on a roof. "],
        "label": "1"})
    assert hs["context"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs["choices"] == ["is using wrap to wrap a pair of skis.", "starts pulling up roofing. on a roof."]
    assert hs["gold"] == 1
    wg = TASKS["winogrande"].from_hub({"sentence": "Sarah was a much better surgeon than Maria so _ always got the "
                                                   "harder cases.", "option1": "Sarah", "option2": "Maria",
                                       "answer": "1"})
    assert requests_of(TASKS["winogrande"], wg) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")]
    assert wg["gold"] == 0
    lam = TASKS["lambada_openai"].from_hub({"text": "he saw the dog  bark at the cat"})
    assert requests_of(TASKS["lambada_openai"], lam) == [("he saw the dog  bark at the", " cat")]
    bl = TASKS["blimp_adjunct_island"].from_hub({"sentence_good": "Who should Derek hug after shocking Richard?",
                                                 "sentence_bad": "Who should Derek hug Richard after shocking?"})
    assert requests_of(TASKS["blimp_adjunct_island"], bl) == [
        ("", " Who should Derek hug after shocking Richard?"), ("", " Who should Derek hug Richard after shocking?")]
    assert bl["gold"] == 0


def test_local_files_give_the_documents_of_the_hub_schema(data_dir) -> None:
    import tiny_zeroshot as z

    piqa = zs_data.load_docs(TASKS["piqa"])
    assert piqa[0] == TASKS["piqa"].from_hub({**z.PIQA[0], "label": 0})
    assert piqa[1]["choices"] == ["go to the park", "go to the tree  and bark"]  # spaces kept
    arc = zs_data.load_docs(TASKS["arc_easy"])
    assert arc[1]["choices"] == ["Lily", "Tom", "the cat"] and arc[1]["gold"] == 1 and arc[2]["gold"] == 0
    assert arc[0]["context"] == "Question: What did the dog do?\nAnswer:"
    assert zs_data.load_docs(TASKS["openbookqa"])[1]["gold"] == 1  # " B".lstrip()
    assert [d["gold"] for d in zs_data.load_docs(TASKS["boolq"])] == [1, 0]
    hs = zs_data.load_docs(TASKS["hellaswag"])
    assert hs[1]["context"] == "Dog. walking: The dog ran. it" and hs[1]["choices"][2] == "sang a song"
    assert hs[0]["gold"] == 2 and len(hs) == 2
    wg = zs_data.load_docs(TASKS["winogrande"])
    assert requests_of(TASKS["winogrande"], wg[0])[1] == ("Lily liked the dog because the dog", " was kind to her.")
    assert zs_data.load_docs(TASKS["lambada_openai"], limit=2)[1] == {
        "context": "The dog ran to the tree and barked at a", "target": " cat"}
    assert len(zs_data.load_docs(TASKS["blimp_adjunct_island"])) == 2


# -- tokenization and log-likelihoods ------------------------------------------------------------


def test_encode_pair_moves_trailing_whitespace_and_splits_the_whole_encoding(tok) -> None:
    enc = encode_pair(tok, "Lily liked the ", "dog")
    assert list(enc.context) == tok_encode(tok, "Lily liked the")
    whole = tok_encode(tok, "Lily liked the dog")
    assert list(enc.context + enc.continuation) == whole
    empty = encode_pair(tok, "", " The dog ran.")
    assert empty.context == (tok.bos_token_id,)
    assert list(empty.continuation) == tok.encode(" The dog ran.", add_special_tokens=False)


def _naive(model, req: Encoded, max_length: int) -> tuple[float, bool]:
    """One request, unbatched, every position's logits: the harness's computation written plainly."""
    whole = list(req.context + req.continuation)[-(max_length + 1):]
    logits = model(torch.tensor([whole[:-1]])).logits[0].double()
    n = len(req.continuation)
    logp = F.log_softmax(logits[-n:], dim=-1)
    tgt = torch.tensor(whole[-n:])
    return float(logp.gather(-1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


def _requests(seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for q in range(7):
        ctx = tuple(torch.randint(3, 128, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist())
        for _ in range(1 + q % 4):  # 1 to 4 choices share a context
            n = int(torch.randint(1, 9, (1,), generator=g))
            reqs.append(Encoded(ctx, tuple(torch.randint(3, 128, (n,), generator=g).tolist())))
    reqs.append(Encoded((5,), (6, 7, 8)))  # an empty-context request (the prefix token only)
    return reqs


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma2"])
@pytest.mark.parametrize("share", [True, False])
def test_batched_loglikelihoods_equal_the_naive_computation(arch: str, share: bool) -> None:
    model = tiny_model(arch)
    reqs = _requests()
    with torch.no_grad():
        expected = [_naive(model, r, 256) for r in reqs]
        for batch_size in (1, 3, 16):
            got = LoglikelihoodRunner(model, batch_size=batch_size, max_length=256, share_context=share,
                                      progress=False).run(reqs)
            for (ll, greedy), (ell, egreedy) in zip(got, expected, strict=True):
                assert ll == pytest.approx(ell, abs=1e-4)
                assert greedy == egreedy


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_packed_questions_share_prefixes_across_contexts_and_choices(arch: str) -> None:
    """WinoGrande-like requests (different contexts, one sentence start), choices that begin with the same
    tokens (scored positions inside the shared prefix), a request that is a prefix of another, duplicates."""
    model = tiny_model(arch)
    reqs = [Encoded((3, 4, 5, 6, 7), (8, 9, 10)), Encoded((3, 4, 5, 11), (8, 9, 10)),  # a blank filled two ways
            Encoded((20, 21), (22, 23, 24, 25)), Encoded((20, 21), (22, 23, 30)),  # choices share (22, 23)
            Encoded((20, 21), (22,)), Encoded((20, 21), (22,)),  # one inside the others' prefix, twice
            Encoded((40, 41, 42), (43, 44))]
    groups = [[0, 1], [2, 3, 4, 5], [6]]
    runner = LoglikelihoodRunner(model, batch_size=1, max_length=256, progress=False)
    assert runner.share_context  # the packed path runs
    with torch.no_grad():
        expected = [_naive(model, r, 256) for r in reqs]
        for given in (groups, None):
            got = runner.run(reqs, groups=given)
            assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)
            assert [g[1] for g in got] == [e[1] for e in expected]


def test_trees_take_the_common_prefix_and_pack_within_capacity() -> None:
    from pare.eval.zeroshot.loglik import _plain_row, build_tree, pack_trees, packed_inputs

    tree = build_tree([_plain_row(0, Encoded((1, 2, 3), (4, 5)), 64), _plain_row(1, Encoded((1, 2, 3), (4, 6)), 64)])
    assert tree.prefix == [1, 2, 3, 4] and [r.inputs for r in tree.rows] == [[], []]  # all shared, all scored
    ids, pos, allowed, scored = packed_inputs([tree])
    assert ids == [1, 2, 3, 4] and pos == [0, 1, 2, 3] and scored == [[2, 3], [2, 3]]
    assert torch.equal(allowed, torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    trees = [build_tree([_plain_row(i, Encoded(tuple(range(1, n)), (9,)), 64)]) for i, n in enumerate([9, 5, 4, 3])]
    rows = pack_trees(trees, capacity=10)
    assert sorted(t.rows[0].index for r in rows for t in r) == [0, 1, 2, 3]
    assert all(sum(t.length for t in r) <= 10 for r in rows) and len(rows) == 2  # 8 + 2, then 4 + 3
    two = build_tree([_plain_row(0, Encoded((1, 2), (3, 4)), 64), _plain_row(1, Encoded((1, 7), (3,)), 64)])
    ids, pos, allowed, scored = packed_inputs([two])  # prefix [1]; own parts [2, 3] and [7]
    assert ids == [1, 2, 3, 7] and pos == [0, 1, 2, 1] and scored == [[1, 2], [3]]
    assert allowed[3].tolist() == [True, False, False, True]  # 7 sees the prefix and itself, not the other choice


def test_groups_must_cover_every_request_once() -> None:
    runner = LoglikelihoodRunner(tiny_model("llama"), progress=False)
    reqs = [Encoded((1, 2), (3,)), Encoded((1, 2), (4,))]
    with pytest.raises(ConfigError, match="exactly once"):
        runner.run(reqs, groups=[[0], [0, 1]])


def test_requests_longer_than_the_context_keep_their_last_tokens() -> None:
    model = tiny_model("llama")
    reqs = [Encoded(tuple(range(3, 40)), (50, 51, 52)), Encoded(tuple(range(3, 40)), (60,)),
            Encoded((9, 10), (11, 12))]
    with torch.no_grad():
        expected = [_naive(model, r, 16) for r in reqs]
        got = LoglikelihoodRunner(model, batch_size=4, max_length=16, progress=False).run(reqs)
    assert [g[0] for g in got] == pytest.approx([e[0] for e in expected], abs=1e-4)


def test_harness_max_length_reads_the_config_then_the_tokenizer(tok) -> None:
    assert harness_max_length(tiny_model("llama"), tok) == 256
    assert harness_max_length(tiny_model("gpt2"), tok) == 256


# -- metrics -------------------------------------------------------------------------------------


def test_acc_and_acc_norm_from_loglikelihoods() -> None:
    task = TASKS["arc_easy"]
    doc = {"context": "Q", "choices": ["a", "bbbb", "cc"], "gold": 1}
    m = doc_metrics(task, doc, [(-2.0, False), (-4.0, False), (-3.0, False)])
    assert m == {"acc": 0.0, "acc_norm": 1.0}  # -2 wins raw; -4/4 = -1 wins per character
    tie = doc_metrics(task, {**doc, "gold": 0}, [(-1.0, False), (-1.0, False), (-5.0, False)])
    assert tie["acc"] == 1.0  # the first of equal values, as np.argmax
    assert "acc_norm" not in doc_metrics(TASKS["winogrande"], {"contexts": ["x", "y"], "target": "t", "gold": 1},
                                         [(-3.0, False), (-1.0, False)])


def test_stderr_is_the_sample_stddev_over_sqrt_n_and_lambada_ppl() -> None:
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert mean_stderr(values) == pytest.approx(statistics.stdev(values) / math.sqrt(5))
    assert math.isnan(mean_stderr([1.0]))
    per_doc = [{"acc": 1.0, "ll": -1.0}, {"acc": 0.0, "ll": -3.0}]
    out = aggregate(TASKS["lambada_openai"], per_doc)
    assert out["ppl"] == pytest.approx(math.exp(2.0)) and out["acc"] == 0.5 and out["n"] == 2


# -- evaluate_tasks end to end and bad input -------------------------------------------------------


def test_evaluate_tasks_on_local_files(data_dir, tok) -> None:
    model = tiny_model("llama")
    names = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa",
             "lambada_openai", "blimp_adjunct_island"]
    res = evaluate_tasks(model, tok, names, limit=2, batch_size=4, progress=False, return_loglikelihoods=True)
    assert list(res["tasks"]) == names
    for name, r in res["tasks"].items():
        assert r["n"] == 2 and 0.0 <= r["acc"] <= 1.0 and "acc_stderr" in r
        assert ("acc_norm" in r) == ("acc_norm" in TASKS[name].metrics)
    assert res["tasks"]["lambada_openai"]["ppl"] > 1.0
    assert res["mean_acc"] == pytest.approx(sum(r["acc"] for r in res["tasks"].values()) / len(names))
    plain = evaluate_tasks(model, tok, names, limit=2, batch_size=1, progress=False, share_context=False,
                           return_loglikelihoods=True)
    for name in names:
        assert [x[0] for x in res["requests"][name]] == pytest.approx([x[0] for x in plain["requests"][name]],
                                                                      abs=1e-4)
        assert plain["tasks"][name]["acc"] == res["tasks"][name]["acc"]


def test_blimp_group_is_the_mean_of_its_paradigms(data_dir, tok, monkeypatch) -> None:
    from pare.eval.zeroshot import tasks as zs_tasks

    monkeypatch.setitem(zs_tasks.GROUPS, "blimp", ("blimp_adjunct_island",))
    res = evaluate_tasks(tiny_model("llama"), tok, "blimp", progress=False)
    assert res["tasks"]["blimp"]["acc"] == res["tasks"]["blimp_adjunct_island"]["acc"] == res["mean_acc"]


def test_bad_input_is_refused_with_what_would_work(data_dir, tok, tmp_path, monkeypatch) -> None:
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"unknown task 'piqaa'.*arc_easy.*lambada_openai.*blimp"):
        resolve_tasks("piqaa,arc_easy")
    for limit in (0, -3):
        with pytest.raises(ConfigError, match="positive integer"):
            evaluate_tasks(model, tok, ["piqa"], limit=limit, progress=False)
    with pytest.raises(ConfigError, match="tokenizer"):
        evaluate_tasks(model, None, ["piqa"], progress=False)
    monkeypatch.setenv("PARE_DATA_DIR", str(tmp_path / "empty"))

    def offline(source):
        raise ConnectionError("offline")

    monkeypatch.setattr(zs_data, "load_hub_rows", offline)
    with pytest.raises(DataNotFoundError) as err:
        evaluate_tasks(model, tok, ["piqa"], progress=False)
    msg = str(err.value)
    assert "valid.jsonl (missing)" in msg and "valid-labels.lst (missing)" in msg
    assert "datasets.load_dataset('baber/piqa', split='validation')" in msg and "offline" in msg


def test_missing_data_without_a_data_dir_names_the_default_places_and_the_hub(tok, tmp_path, monkeypatch) -> None:
    from pare.calibration import sources

    monkeypatch.delenv("PARE_DATA_DIR", raising=False)
    places = [tmp_path / "a" / "shared" / "data", tmp_path / "b" / "shared" / "data"]
    monkeypatch.setattr(sources, "_default_data_dirs", lambda: places)  # the one place both loaders look up
    monkeypatch.setattr(zs_data, "load_hub_rows", lambda source: (_ for _ in ()).throw(ConnectionError("no network")))
    with pytest.raises(DataNotFoundError) as err:
        evaluate_tasks(tiny_model("llama"), tok, ["winogrande"], progress=False)
    msg = str(err.value)
    assert "PARE_DATA_DIR is not set" in msg and str(places[0]) in msg and str(places[1]) in msg
    assert "datasets.load_dataset(" in msg and "no network" in msg and "Fix: set PARE_DATA_DIR" in msg


def test_a_limit_reads_the_same_first_documents(data_dir) -> None:
    for name in ("hellaswag", "piqa", "winogrande"):
        task = TASKS[name]
        paths = [data_dir / rel for rel in task.local_files]
        everything = task.read_local(paths, None)
        assert len(everything) >= 2
        assert task.read_local(paths, 1)[:1] == everything[:1]
        assert zs_data.load_docs(task, 1) == everything[:1]


def test_hub_rows_are_used_when_the_local_files_are_missing(tmp_path, tok, monkeypatch) -> None:
    monkeypatch.setenv("PARE_DATA_DIR", str(tmp_path / "empty"))
    rows = [{"goal": "Say hello", "sol1": "to Tom", "sol2": "to the sun", "label": 0}] * 3
    monkeypatch.setattr(zs_data, "load_hub_rows", lambda source: rows)
    res = evaluate_tasks(tiny_model("llama"), tok, ["piqa"], limit=2, progress=False)
    assert res["tasks"]["piqa"]["n"] == 2
