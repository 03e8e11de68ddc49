"""Tests of unfold.data: the addition task (MATH §3.7), sequence-classification data, and the local text loaders
(on small fixture files written here)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from energy._validation import EnergyInputError
from unfold.data import (
    EQUALS,
    FIXED_VOCABULARY,
    IGNORE_INDEX,
    PLUS,
    AdditionDataset,
    DataNotFoundError,
    ShuffledBatches,
    WordVectors,
    addition_batch,
    addition_length,
    addition_loss,
    addition_mse_loss,
    addition_operands,
    answer_accuracy,
    answer_positions,
    build_vocabulary,
    decode_addition,
    embed_sentences,
    encode_addition,
    iterate_batches,
    load_digits_sequences,
    load_glove,
    load_imdb,
    load_sst2,
    seeded_embedding_table,
    synthetic_sequence_classification,
    tokenize,
    zipf_sentences,
)

# ------------------------------------------------------------------------------------------------------ addition


def _nine_pair_rate(tokens: torch.Tensor, n: int = 5) -> float:
    x, y = tokens[:, :n], tokens[:, n + 1 : 2 * n + 1]
    return float(((x + y) == 9).double().mean())


@pytest.mark.parametrize("n_digits", [5, 3])
def test_addition_batch_layout_and_sums(gen, n_digits):
    n = n_digits
    tokens, targets = addition_batch(257, generator=gen, n_digits=n)
    L = addition_length(n)
    assert L == 3 * n + 3 and tokens.shape == targets.shape == (257, L)
    assert tokens.dtype == targets.dtype == torch.long
    assert (tokens[:, n] == PLUS).all() and (tokens[:, 2 * n + 1] == EQUALS).all()
    digits = torch.cat([tokens[:, :n], tokens[:, n + 1 : 2 * n + 1], tokens[:, 2 * n + 2 :]], dim=1)
    assert digits.min() >= 0 and digits.max() <= 9
    a, b, c = addition_operands(tokens)
    assert torch.equal(a + b, c)  # the written answer is the sum, carries included
    pos = answer_positions(n)
    assert pos.tolist() == list(range(2 * n + 1, 3 * n + 2))
    assert torch.equal(targets[:, pos], tokens[:, pos + 1])  # next-token targets at the answer positions
    others = torch.ones(L, dtype=torch.bool)
    others[pos] = False
    assert (targets[:, others] == IGNORE_INDEX).all()


def test_answers_zero_padded_and_decoded():
    tokens, _ = encode_addition([1, 99999, 12345], [2, 1, 67890])
    assert decode_addition(tokens) == ["00001+00002=000003", "99999+00001=100000", "12345+67890=080235"]
    a, b, c = addition_operands(tokens)
    assert a.tolist() == [1, 99999, 12345] and c.tolist() == [3, 100000, 80235]
    with pytest.raises(EnergyInputError, match="10\\^5"):
        encode_addition([100000], [0])


def test_carry_rich_batches_rewrite_pairs_at_the_right_rate():
    g = torch.Generator().manual_seed(0)
    plain, _ = addition_batch(4000, generator=g)
    rich, _ = addition_batch(4000, generator=g, carry_rich=True)
    se = math.sqrt(0.28 * 0.72 / 20000)  # 20,000 digit pairs per batch
    assert abs(_nine_pair_rate(plain) - 0.1) < 6 * se
    assert abs(_nine_pair_rate(rich) - (0.2 + 0.8 * 0.1)) < 6 * se

    # carry chains: a pair summing to 9 passes on an incoming carry, so carry-rich sums propagate further
    def longest_propagated_carry(tokens):
        x, y = tokens[:, :5].flip(1), tokens[:, 6:11].flip(1)  # least significant digit first
        carry = torch.zeros(len(tokens), dtype=torch.long)
        run = torch.zeros(len(tokens), dtype=torch.long)
        longest = torch.zeros(len(tokens), dtype=torch.long)
        for k in range(5):
            s = x[:, k] + y[:, k] + carry
            propagated = (carry == 1) & (x[:, k] + y[:, k] == 9)
            run = torch.where(propagated, run + 1, torch.zeros_like(run))
            longest = torch.maximum(longest, run)
            carry = (s >= 10).long()
        return longest.double().mean()

    assert longest_propagated_carry(rich) > 1.5 * longest_propagated_carry(plain)

    every, _ = addition_batch(50, generator=g, carry_rich=True, carry_rich_rate=1.0)
    a, b, c = addition_operands(every)  # every pair sums to 9: a + b = 99999
    assert (b == 99999 - a).all() and (c == 99999).all()


def test_addition_dataset_is_seeded_and_replayable():
    ds = AdditionDataset(16, seed=4)
    first = ds.take(5)
    again = ds.take(5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = AdditionDataset(16, seed=5).take(5)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    rich = torch.cat([t for t, _ in AdditionDataset(200, seed=0, carry_rich_fraction=1.0).take(5)])
    plain = torch.cat([t for t, _ in AdditionDataset(200, seed=0, carry_rich_fraction=0.0).take(5)])
    assert _nine_pair_rate(rich) > 0.24 and _nine_pair_rate(plain) < 0.14
    with pytest.raises(EnergyInputError, match="carry_rich_fraction"):
        AdditionDataset(4, seed=0, carry_rich_fraction=1.5)


def test_addition_losses(gen):
    tokens, targets = addition_batch(7, generator=gen)
    logits = torch.randn(7, 18, 12, generator=gen, dtype=torch.float64)
    pos = answer_positions()
    manual = -F.log_softmax(logits[:, pos], -1).gather(-1, targets[:, pos, None]).mean()
    torch.testing.assert_close(addition_loss(logits, targets), manual)
    # loss and accuracy ignore every other position
    other = logits.clone()
    other[:, :11] += 5 * torch.randn(7, 11, 12, generator=gen, dtype=torch.float64)
    other[:, 17] = 0.0
    assert addition_loss(other, targets) == addition_loss(logits, targets)
    onehot = F.one_hot(targets[:, pos], 12).to(torch.float64)
    mse = ((logits[:, pos] - onehot) ** 2).sum() / (7 * 6 * 12)
    torch.testing.assert_close(addition_mse_loss(logits, targets), mse)
    perfect = logits.clone()
    perfect[:, pos] = onehot
    assert float(addition_mse_loss(perfect, targets)) == 0.0
    assert answer_accuracy(perfect, targets) == (7, 7)
    perfect[0, pos[3]] = torch.roll(onehot[0, 3], 1)
    assert answer_accuracy(perfect, targets) == (6, 7)
    with pytest.raises(EnergyInputError, match="shape"):
        addition_loss(logits[:, :-1], targets)


def test_addition_bad_arguments(gen):
    with pytest.raises(EnergyInputError, match="batch_size"):
        addition_batch(0, generator=gen)
    with pytest.raises(EnergyInputError, match="generator"):
        addition_batch(2, generator=0)
    with pytest.raises(EnergyInputError, match="n_digits"):
        addition_batch(2, generator=gen, n_digits=0)
    with pytest.raises(EnergyInputError, match="3n"):
        decode_addition(torch.zeros(2, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------------ classification data


def test_digits_as_sequences():
    data = load_digits_sequences(seed=0)
    N = len(data.y_train) + len(data.y_test)
    assert N == 1797 and data.X_train.shape[1:] == (8, 8) and data.n_classes == 10
    assert 0.0 <= float(data.X_train.min()) and float(data.X_train.max()) <= 1.0
    assert abs(len(data.y_test) / N - 0.25) < 0.01
    for c in range(10):  # stratified: every class in both parts with about the same share
        share = float((data.y_test == c).sum()) / float((torch.cat([data.y_train, data.y_test]) == c).sum())
        assert abs(share - 0.25) < 0.03
    again = load_digits_sequences(seed=0)
    assert torch.equal(again.X_test, data.X_test)
    assert not torch.equal(load_digits_sequences(seed=1).y_test, data.y_test)
    # the training and test images are different images (no example in both)
    train_set = {tuple(x.flatten().tolist()) for x in data.X_train}
    assert sum(tuple(x.flatten().tolist()) in train_set for x in data.X_test) < 0.05 * len(data.y_test)
    half = load_digits_sequences(tokens="half-rows", seed=0)
    assert half.X_train.shape[1:] == (16, 4)
    torch.testing.assert_close(half.X_train[:, 2], data.X_train[:, 1, :4])  # token 2 = left half of row 1
    with pytest.raises(EnergyInputError, match="tokens"):
        load_digits_sequences(tokens="columns")


def test_synthetic_task_follows_its_rule_and_is_learnable():
    data = synthetic_sequence_classification(400, 400, n_tokens=6, d=5, n_classes=3, seed=0)
    assert data.X_train.shape == (400, 6, 5) and data.n_classes == 3
    again = synthetic_sequence_classification(400, 400, n_tokens=6, d=5, n_classes=3, seed=0)
    assert torch.equal(again.X_train, data.X_train) and torch.equal(again.y_test, data.y_test)
    # nearest class mean of the mean token (fitted on train) beats chance (1/3) clearly on test
    means = torch.stack([data.X_train[data.y_train == c].mean((0, 1)) for c in range(3)])
    pred = torch.cdist(data.X_test.mean(1), means).argmin(1)
    assert float((pred == data.y_test).double().mean()) > 0.6
    # without signal the same classifier is at chance: the labels come from the planted tokens
    noise = synthetic_sequence_classification(400, 400, n_tokens=6, d=5, n_classes=3, signal=0.0, seed=0)
    means0 = torch.stack([noise.X_train[noise.y_train == c].mean((0, 1)) for c in range(3)])
    acc0 = float((torch.cdist(noise.X_test.mean(1), means0).argmin(1) == noise.y_test).double().mean())
    assert acc0 < 0.45
    with pytest.raises(EnergyInputError, match="n_signal"):
        synthetic_sequence_classification(n_tokens=3, n_signal=4)


def test_batches():
    X, y = torch.arange(10.0).reshape(10, 1, 1), torch.arange(10)
    sb = ShuffledBatches(X, y, 5, seed=1)
    it = iter(sb)
    epoch = [next(it) for _ in range(2)]
    assert sorted(torch.cat([b[1] for b in epoch]).tolist()) == list(range(10))  # one epoch = one permutation
    assert all(torch.equal(bx.flatten(), by.double().float()) for bx, by in epoch)
    it2 = iter(sb)
    assert all(torch.equal(next(it2)[1], b[1]) for b in epoch)  # replayable
    assert [len(b[1]) for b in iterate_batches(X, y, 4)] == [4, 4, 2]
    with pytest.raises(EnergyInputError, match="batch_size"):
        ShuffledBatches(X, y, 11, seed=0)


# ----------------------------------------------------------------------------------------------------------- text


def test_tokenize():
    assert tokenize("It's a GREAT film, isn't it?") == ["it", "'s", "a", "great", "film", ",", "is", "n't", "it", "?"]
    assert tokenize("does n't work ... 10/10!") == ["does", "n't", "work", ".", ".", ".", "10", "/", "10", "!"]
    assert build_vocabulary(["A b.", "b c"]) == {"a", "b", ".", "c"}


def _write_imdb(root):
    for split in ("train", "test"):
        for label, texts in (("pos", ["Great movie!<br />Loved it.", "Wonderful."]), ("neg", ["Awful.", "Bad film"])):
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i, t in enumerate(texts):
                (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(f"{split} {t}", encoding="utf-8")


def test_load_imdb(tmp_path):
    _write_imdb(tmp_path)
    texts, labels = load_imdb(tmp_path / "aclImdb", "test")
    assert labels.tolist() == [0, 0, 1, 1]
    assert texts[2] == "test Great movie! Loved it." and texts[0] == "test Awful."
    texts_p, _ = load_imdb(tmp_path, "train", max_per_class=1)  # the parent folder works too
    assert texts_p == ["train Awful.", "train Great movie! Loved it."]
    with pytest.raises(DataNotFoundError, match=r"aclImdb.*train/pos.*--imdb") as err:
        load_imdb(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(err.value)
    with pytest.raises(EnergyInputError, match="split"):
        load_imdb(tmp_path, "dev")


def test_load_sst2(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\nit 's a charming journey . \t1\nboring \t0\n\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nunflinchingly bleak\t0\n")
    sentences, labels = load_sst2(folder, "train")
    assert sentences == ["it 's a charming journey .", "boring"] and labels.tolist() == [1, 0]
    assert load_sst2(folder / "dev.tsv")[0] == ["unflinchingly bleak"]
    assert load_sst2(folder)[1].tolist() == [0]  # dev is the default split
    with pytest.raises(DataNotFoundError, match=r"SST-2.*--sst2"):
        load_sst2(tmp_path / "missing", "dev")
    (folder / "dev.tsv").write_text("index\tsentence\n0\tfoo\n")
    with pytest.raises(EnergyInputError, match="header"):
        load_sst2(folder, "dev")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfoo\tpositive\n")
    with pytest.raises(EnergyInputError, match="line 2"):
        load_sst2(folder, "dev")


def test_load_glove_and_embed(tmp_path):
    f = tmp_path / "glove.txt"
    f.write_text(
        "the 0.1 0.2 0.3\n"
        ", 1 2 3\n"
        ". . . -1 -2 -3\n"  # a word with spaces, as in glove.840B
        "film 0.5 0.5 0.5\n"
        "the 9 9 9\n"  # duplicate: the first occurrence wins
        "good 4e-1 -1.5 2\n",
        encoding="utf-8",
    )
    wv = load_glove(f)
    assert wv.words == ["the", ",", ". . .", "film", "good"] and wv.dim == 3
    torch.testing.assert_close(wv["the"], torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(wv["good"], torch.tensor([0.4, -1.5, 2.0]))
    assert load_glove(f, vocab={"film", "good", "absent"}).words == ["film", "good"]
    assert load_glove(f, max_words=2).words == ["the", ","]

    Y, lengths = embed_sentences(["The film, the GOOD film!", "unknown words only", ["good"]], wv, max_len=4)
    assert Y.shape == (3, 4, 3) and lengths.tolist() == [4, 0, 1]
    torch.testing.assert_close(Y[0], torch.stack([wv["the"], wv["film"], wv[","], wv["the"]]))  # truncated at 4
    assert float(Y[1].abs().sum()) == 0.0 and float(Y[2, 1:].abs().sum()) == 0.0

    with pytest.raises(DataNotFoundError, match=r"GloVe.*--glove"):
        load_glove(tmp_path / "absent.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1 2\nb 1\n")
    with pytest.raises(EnergyInputError, match="line 2"):
        load_glove(bad)
    bad.write_text("a 1 2\nb 1 x\n")
    with pytest.raises(EnergyInputError, match="line 2"):
        load_glove(bad)
    assert load_glove(bad, vocab={"a"}).words == ["a"]  # stops once every requested word is found
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(EnergyInputError, match="empty"):
        load_glove(tmp_path / "empty.txt")


def test_offline_text_stand_in():
    assert len(FIXED_VOCABULARY) == len(set(FIXED_VOCABULARY)) == 122
    table = seeded_embedding_table(FIXED_VOCABULARY, 64, seed=3)
    assert isinstance(table, WordVectors) and table.vectors.shape == (122, 64)
    assert torch.equal(table.vectors, seeded_embedding_table(FIXED_VOCABULARY, 64, seed=3).vectors)
    assert not torch.equal(table.vectors, seeded_embedding_table(FIXED_VOCABULARY, 64, seed=4).vectors)
    assert abs(float(table.vectors.std()) * 8 - 1) < 0.05  # std 1/√d
    sentences = zipf_sentences(300, min_len=5, max_len=12, seed=0)
    assert sentences == zipf_sentences(300, min_len=5, max_len=12, seed=0)
    assert all(5 <= len(s) <= 12 and set(s) <= set(FIXED_VOCABULARY) for s in sentences)
    counts = {w: 0 for w in FIXED_VOCABULARY}
    for s in sentences:
        for w in s:
            counts[w] += 1
    assert counts["the"] > 5 * counts[FIXED_VOCABULARY[60]]  # Zipf: rank 1 vs rank 61
    Y, lengths = embed_sentences(sentences[:4], table, max_len=12)
    assert torch.equal(lengths, torch.tensor([len(s) for s in sentences[:4]]))
    with pytest.raises(EnergyInputError, match="duplicate"):
        seeded_embedding_table(["a", "a"], 4, seed=0)
