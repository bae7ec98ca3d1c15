"""TRL options and inputs a DPOTrainer user may bring to TISDPOTrainer: each either behaves
as in TRL's DPOTrainer or is refused in one line, at construction, naming what to change."""
import warnings

import datasets
import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration needs trl (pip install 'tisdpo[trl]')")

import trl_cases as C  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from tisdpo.integrations.trl import TISDPOConfig, TISDPOTrainer  # noqa: E402
from tisdpo.integrations.trl_weights import trl_completion_ids  # noqa: E402

COLS = r"\['chosen_weight', 'rejected_weight'\]"


@pytest.fixture(scope="module")
def tok():
    return C.tokenizer()


def _weighted(tok, n, seed=0):
    """``n`` records with unit weights, one per completion token as TRL tokenises them."""
    rows = C.records(n, seed)
    for r in rows:
        ids = trl_completion_ids(tok, r["prompt"], r["chosen"], r["rejected"])[0]
        r["chosen_weight"], r["rejected_weight"] = ([1.0] * len(x) for x in ids)
    return datasets.Dataset.from_list(rows)


def _trainer(tok, tmp_path, train, *, eval_dataset=None, **options):
    args = C.config(TISDPOConfig, tmp_path, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TISDPOTrainer(model=C.tiny_model(tok), ref_model=C.tiny_model(tok), args=args,
                             train_dataset=train, eval_dataset=eval_dataset,
                             processing_class=tok)


def _one_line(err):
    assert "\n" not in str(err.value), str(err.value)


# ------------------------------------------------------------------ weight columns per split

@pytest.mark.parametrize("as_dict", [False, True])
def test_a_weighted_method_refuses_an_eval_split_without_weights_at_init(tok, tmp_path,
                                                                          as_dict):
    """Without the check, training ran and the first evaluation batch failed."""
    plain = C.dataset(4, seed=1)
    name = "held_out" if as_dict else "eval"
    with pytest.raises(ValueError, match=rf"method='tisdpo' weights tokens but the '{name}' "
                                         rf"dataset has no {COLS} columns") as err:
        _trainer(tok, tmp_path, _weighted(tok, 4), method="tisdpo",
                 eval_dataset={name: plain} if as_dict else plain)
    _one_line(err)


def test_a_weighted_method_refuses_an_unweighted_dataset_given_to_evaluate(tok, tmp_path):
    trainer = _trainer(tok, tmp_path, _weighted(tok, 4), method="tisdpo")
    with pytest.raises(ValueError, match=rf"the 'eval' dataset has no {COLS} columns") as err:
        trainer.evaluate(eval_dataset=C.dataset(4, seed=1))
    _one_line(err)


NAMED = "chosen_weight,rejected_weight"


@pytest.mark.parametrize("train_weighted", [True, False])
def test_an_eval_split_weighted_unlike_train_is_refused(tok, tmp_path, train_weighted):
    """Columns named for an unweighted preset (loss_type='sigmoid') are used where present:
    an eval split that differs would log another loss as eval_loss."""
    weighted, plain = _weighted(tok, 4), C.dataset(4, seed=1)
    train, evaluation = (weighted, plain) if train_weighted else (plain, _weighted(tok, 4, 1))
    how = "has no" if train_weighted else "has the"
    with pytest.raises(ValueError, match=rf"token_weights='{NAMED}': the 'eval' dataset {how} "
                                         rf"{COLS} columns but train_dataset") as err:
        _trainer(tok, tmp_path, train, eval_dataset=evaluation, token_weights=NAMED)
    _one_line(err)


def test_eval_splits_weighted_like_train_are_accepted(tok, tmp_path):
    _trainer(tok, tmp_path, _weighted(tok, 4), eval_dataset=_weighted(tok, 4, 1),
             token_weights=NAMED)
    _trainer(tok, tmp_path / "none", _weighted(tok, 4), eval_dataset=C.dataset(4, seed=1),
             token_weights="none")
    _trainer(tok, tmp_path / "plain", C.dataset(4), eval_dataset=C.dataset(4, seed=1))


def test_auto_trains_an_unweighted_preset_as_dpo_trainer_does_on_weighted_data(tok, tmp_path):
    """The one-import switch: a dataset with weight columns (the weights stage's TRL export,
    say) under loss_type='sigmoid' trains plain DPO, as TRL's DPOTrainer does (which
    ignores the columns), and says so; naming the columns trains with them."""
    rows = _weighted(tok, 4).to_list()
    g = torch.Generator().manual_seed(0)
    for r in rows:
        for c in ("chosen_weight", "rejected_weight"):
            r[c] = (0.2 + 2 * torch.rand(len(r[c]), generator=g)).tolist()
    train = datasets.Dataset.from_list(rows)

    def first_loss(**options):
        args = C.config(TISDPOConfig, tmp_path / str(options), max_steps=1,
                        gradient_accumulation_steps=1, **options)
        return C.run(TISDPOTrainer, args, tok=tok, train=train,
                     ref_model=C.tiny_model(tok, seed=1))[0][0]["loss"]

    with pytest.warns(UserWarning, match=r"method 'dpo' does not weight tokens: "
                                         r"train_dataset's \['chosen_weight', "
                                         r"'rejected_weight'\] columns are ignored"):
        TISDPOTrainer(model=C.tiny_model(tok), ref_model=C.tiny_model(tok), train_dataset=train,
                      args=C.config(TISDPOConfig, tmp_path), processing_class=tok)
    plain = first_loss(token_weights="none")
    assert first_loss() == plain != first_loss(token_weights=NAMED)


# ------------------------------------------------------------------ options TRL honours

def test_a_reference_free_method_refuses_sync_ref_model(tok, tmp_path):
    """TRL's own message named precompute_ref_log_probs, which the user had not set."""
    with pytest.raises(ValueError, match=r"sync_ref_model=True: method 'simpo' is "
                                         r"reference-free") as err:
        C.config(TISDPOConfig, tmp_path, method="simpo", beta=2.0, sync_ref_model=True)
    _one_line(err)


def test_cdpo_code_refuses_pad_to_multiple_of(tok, tmp_path):
    """cdpo_code's mean over B×T slots counts padding: padding to a multiple of 64 cut the
    gradient norm of the first step about threefold on this data."""
    with pytest.raises(ValueError, match=r"pad_to_multiple_of=64: method 'cdpo_code'") as err:
        C.config(TISDPOConfig, tmp_path, method="cdpo_code", token_weights="none",
                 pad_to_multiple_of=64)
    _one_line(err)
    C.config(TISDPOConfig, tmp_path, method="dpo", pad_to_multiple_of=64)


def test_per_sequence_reference_columns_are_ignored_without_precompute(tok, tmp_path):
    """A dataset saved with TRL's per-sequence ref_*_logps (floats) trains as DPOTrainer
    trains it without precompute_ref_log_probs: the columns are not read."""
    rows = C.records(4)
    for r in rows:
        r["ref_chosen_logps"], r["ref_rejected_logps"] = -5.0, -6.0
    train = datasets.Dataset.from_list(rows)
    stock = C.run(DPOTrainer, C.config(DPOConfig, tmp_path / "trl"), tok=tok, train=train)
    mine = C.run(TISDPOTrainer, C.config(TISDPOConfig, tmp_path / "tisdpo"), tok=tok,
                 train=train)
    assert stock[0] and len(stock[0]) == len(mine[0])
    for a, b in zip(stock[0], mine[0]):
        C.assert_logs_match(a, b, beta=0.1, what="ref columns")


def test_weight_columns_that_are_not_lists_are_named(tok, tmp_path):
    rows = C.records(4)
    for r in rows:
        r["chosen_weight"], r["rejected_weight"] = 1.0, 1.0
    with pytest.raises(ValueError, match=r"^train field 'chosen_weight' holds double values; "
                                         r"TISDPOTrainer needs per-token lists") as err:
        _trainer(tok, tmp_path, datasets.Dataset.from_list(rows), method="tisdpo")
    _one_line(err)


# a NaN (null in JSON) is what the weights export writes for a token the weights stage did
# not score: the error says so
UNSCORED = r" \(no value was computed for this token: .*\)"


@pytest.mark.parametrize("value, shown, note", [(None, "None", UNSCORED),
                                                (float("nan"), "nan", UNSCORED),
                                                (float("-inf"), "-inf", "")])
def test_a_weight_that_is_not_a_finite_number_is_named_before_training(tok, tmp_path, value,
                                                                          shown, note):
    train = _weighted(tok, 6).to_list()
    train[4]["rejected_weight"][2] = value
    with pytest.raises(ValueError, match=rf"^train record 4, field 'rejected_weight': value 2 "
                                         rf"is {shown}, not a finite number{note}$") as err:
        _trainer(tok, tmp_path, datasets.Dataset.from_list(train), method="tisdpo")
    _one_line(err)
    train[4]["rejected_weight"] = None                       # the whole list
    with pytest.raises(ValueError, match=r"^train record 4, field 'rejected_weight': missing$"):
        _trainer(tok, tmp_path, datasets.Dataset.from_list(train), method="tisdpo")
    train = _weighted(tok, 4).to_list()                      # a stream: at its first batch
    train[1]["chosen_weight"][0] = value
    stream = datasets.IterableDataset.from_generator(lambda: iter(train))
    trainer = _trainer(tok, tmp_path, stream, method="tisdpo", max_steps=1)
    with pytest.raises(ValueError, match=rf"^column 'chosen_weight': value 0 is {shown}, not a "
                                         rf"finite number{note}$"):
        trainer.train()


def test_negative_weights_are_used_and_named(tok, tmp_path):
    """As in files of TIS-DPO's official code (sign-flipped raw scores): a warning."""
    rows = _weighted(tok, 4).to_list()
    rows[2]["chosen_weight"][0] = -0.3
    args = C.config(TISDPOConfig, tmp_path, method="tisdpo")
    with pytest.warns(UserWarning, match=r"^1 of \d+ token weights in the train dataset are "
                                         r"negative: used as given"):
        TISDPOTrainer(model=C.tiny_model(tok), ref_model=C.tiny_model(tok), args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)


def test_a_stream_with_one_weight_column_is_refused_at_its_first_batch(tok, tmp_path):
    """An IterableDataset's columns are known only when it is read: one of the two weight
    columns is an error there, not an unweighted loss."""
    rows = _weighted(tok, 4).remove_columns("chosen_weight").to_list()
    stream = datasets.IterableDataset.from_generator(lambda: iter(rows))
    trainer = _trainer(tok, tmp_path, stream, max_steps=1, token_weights=NAMED)
    with pytest.raises(ValueError, match=r"^column 'chosen_weight' is missing but "
                                         r"'rejected_weight' is given") as err:
        trainer.train()
    _one_line(err)


def test_a_kl_preset_refuses_a_reference_capped_otherwise(tok, tmp_path):
    """The token-KL op caps the policy's and the reference's logits with one softcap."""
    ref = C.tiny_model(tok)
    ref.config.final_logit_softcapping = 5.0
    args = C.config(TISDPOConfig, tmp_path, method="tdpo2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"policy's softcap is None and the ref_model's "
                                             r"5.0; give a reference of the same family"):
            TISDPOTrainer(model=C.tiny_model(tok), ref_model=ref, args=args,
                          train_dataset=C.dataset(4), processing_class=tok)


# ------------------------------------------------------------------ the same as DPOTrainer

def test_an_uneven_last_batch_truncated_from_the_end_steps_as_dpo_trainer(tok, tmp_path):
    """7 pairs, 2 per micro-batch, 2 accumulated: the last step has one micro-batch of one
    pair; keep_end truncation cuts completions, with reference log-probs precomputed."""
    over = dict(max_steps=-1, num_train_epochs=1, max_length=20, truncation_mode="keep_end",
                precompute_ref_log_probs=True)
    train = C.dataset(7)
    stock = C.run(DPOTrainer, C.config(DPOConfig, tmp_path / "trl", **over), tok=tok,
                  train=train, with_ref=False)
    mine = C.run(TISDPOTrainer, C.config(TISDPOConfig, tmp_path / "tisdpo", **over), tok=tok,
                 train=train, with_ref=False)
    assert len(stock[0]) == len(mine[0]) == 2
    for a, b in zip(stock[0], mine[0]):
        C.assert_logs_match(a, b, beta=0.1, what="uneven")
    C.assert_params_match(stock[2], mine[2], stock[3])


def test_compute_metrics_and_predict_see_what_dpo_trainer_gives(tok, tmp_path):
    """With compute_metrics, evaluation asks compute_loss for outputs: the same logits, the
    same loss, metrics and keys as DPOTrainer, and predict() too."""
    got = {}
    for name, trainer_cls, config_cls in (("trl", DPOTrainer, DPOConfig),
                                          ("tisdpo", TISDPOTrainer, TISDPOConfig)):
        shapes = []

        def metrics(pred, shapes=shapes):
            shapes.append(pred.predictions.shape)
            return {"mean_logit": float(pred.predictions.mean())}

        args = C.config(config_cls, tmp_path / name, max_steps=1)
        _, _, _, _, trainer = C.run(trainer_cls, args, tok=tok, train=C.dataset(4),
                                    evaluation=C.dataset(4, seed=1), compute_metrics=metrics)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluated = trainer.evaluate()
            predicted = trainer.predict(trainer.eval_dataset)
        got[name] = evaluated, predicted, shapes
    (ev_a, pr_a, shapes_a), (ev_b, pr_b, shapes_b) = got["trl"], got["tisdpo"]
    assert shapes_a == shapes_b and len(shapes_a) == 3
    keys = [k for k in ev_a if "runtime" not in k and "per_second" not in k]
    C.assert_logs_match(ev_a, ev_b, beta=0.1, keys=keys, what="evaluate")
    assert pr_a.predictions.shape == pr_b.predictions.shape
    C.assert_logs_match(pr_a.metrics, pr_b.metrics, beta=0.1, what="predict",
                        keys=["test_loss", "test_mean_logit"])


def test_token_columns_are_checked_where_max_length_keeps_them():
    """check_token_columns on any list layout (fixed-size, several chunks, a slice): a NaN
    is refused, naming the record, only where TRL's collator keeps its token (the first
    max_length tokens of prompt + completion, or the last under keep_end)."""
    from tisdpo.integrations.trl_data import check_token_columns

    nan = float("nan")
    base = {"prompt_ids": [[1, 2], [3, 4]], "chosen_ids": [[5, 6, 7], [5, 6, 7]],
            "rejected_ids": [[8, 9, 9], [8, 9, 9]],
            "chosen_weight": [[1.0, 1.0, 1.0], [1.0, nan, 1.0]],   # record 1: middle token
            "rejected_weight": [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]}
    seq = getattr(datasets, "List", None) or datasets.Sequence
    fixed = datasets.Features({**{c: seq(datasets.Value("int64")) for c in
                                  ("prompt_ids", "chosen_ids", "rejected_ids")},
                               **{c: seq(datasets.Value("float32"), length=3) for c in
                                  ("chosen_weight", "rejected_weight")}})
    one = datasets.Dataset.from_dict(base)
    layouts = {"list": one, "fixed": datasets.Dataset.from_dict(base, features=fixed),
               "chunks": datasets.concatenate_datasets([one.select([0]), one.select([1])]),
               "slice": datasets.concatenate_datasets([one, one]).select([2, 3])}
    cols = ("chosen_weight", "rejected_weight")
    for layout, ds in layouts.items():
        for max_length, mode, refused in ((None, "keep_start", True), (3, "keep_start", False),
                                          (4, "keep_start", True), (1, "keep_end", False),
                                          (2, "keep_end", True)):
            check = lambda: check_token_columns(ds, cols, name="train", max_length=max_length,
                                                truncation_mode=mode)
            if refused:
                with pytest.raises(ValueError, match=r"^train record 1, field 'chosen_weight': "
                                                     r"value 1 is nan"):
                    check()
            else:
                check()
