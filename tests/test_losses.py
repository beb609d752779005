"""Losses against NumPy references."""
import numpy as np

from vlm_jax.losses import IGNORE_ID, clip_loss, own_similarity, siglip_loss, similarity, token_cross_entropy


def _log_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_token_cross_entropy_shifts_and_ignores():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, 7).astype(np.float32) * 3
  labels = rng.randint(0, 7, (2, 5)).astype(np.int32)
  labels[0, 2] = IGNORE_ID
  labels[1, :3] = IGNORE_ID
  loss_sum, count = token_cross_entropy(logits, labels)
  expected, n = 0.0, 0
  for b in range(2):
    for t in range(4):  # logits at t predict the label at t + 1
      if labels[b, t + 1] != IGNORE_ID:
        expected -= _log_softmax(logits[b, t].astype(np.float64))[labels[b, t + 1]]
        n += 1
  assert int(count) == n == 5  # row 0: 4 - 1 ignored; row 1: 4 - 2 ignored
  np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-6)


def test_token_cross_entropy_all_ignored_is_zero():
  loss_sum, count = token_cross_entropy(np.ones((1, 3, 4), np.float32), np.full((1, 3), IGNORE_ID, np.int32))
  assert float(loss_sum) == 0.0 and int(count) == 0


def _normalized(rng, n, e):
  x = rng.randn(n, e)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_clip_loss_matches_numpy():
  rng = np.random.RandomState(1)
  img, txt = _normalized(rng, 4, 6), _normalized(rng, 4, 6)
  logits = 10.0 * img.astype(np.float64) @ txt.T.astype(np.float64)
  idx = np.arange(4)
  expected = -0.5 * (_log_softmax(logits, 1)[idx, idx].mean() + _log_softmax(logits, 0)[idx, idx].mean())
  np.testing.assert_allclose(float(clip_loss(img, txt, np.float32(10.0))), expected, rtol=1e-5)


def test_clip_loss_hard_negatives_join_only_their_image_row():
  rng = np.random.RandomState(3)
  img, txt, neg = _normalized(rng, 4, 6), _normalized(rng, 4, 6), _normalized(rng, 8, 6).reshape(4, 2, 6)
  valid = np.array([[True, True], [True, False], [False, False], [True, True]])
  logits = 10.0 * img.astype(np.float64) @ txt.T.astype(np.float64)
  negative = 10.0 * np.einsum("ie,ike->ik", img.astype(np.float64), neg.astype(np.float64))
  rows = np.concatenate([logits, np.where(valid, negative, -np.inf)], axis=1)
  idx = np.arange(4)
  expected = -0.5 * (_log_softmax(rows, 1)[idx, idx].mean() + _log_softmax(logits, 0)[idx, idx].mean())
  got = float(clip_loss(img, txt, np.float32(10.0), neg, valid))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert got > float(clip_loss(img, txt, np.float32(10.0)))  # negatives only ever add to the loss
  none_valid = clip_loss(img, txt, np.float32(10.0), neg, np.zeros((4, 2), bool))
  np.testing.assert_allclose(float(none_valid), float(clip_loss(img, txt, np.float32(10.0))), rtol=1e-6)


def test_siglip_loss_hard_negatives_are_extra_negative_pairs():
  rng = np.random.RandomState(4)
  img, txt, neg = _normalized(rng, 4, 6), _normalized(rng, 4, 6), _normalized(rng, 8, 6).reshape(4, 2, 6)
  valid = np.array([[True, False], [True, True], [False, False], [True, True]])
  logits = 10.0 * img.astype(np.float64) @ txt.T.astype(np.float64) - 3.0
  negative = 10.0 * np.einsum("ie,ike->ik", img.astype(np.float64), neg.astype(np.float64)) - 3.0
  z = 2 * np.eye(4) - 1
  expected = (np.sum(np.log1p(np.exp(-z * logits))) + np.sum(np.where(valid, np.log1p(np.exp(negative)), 0))) / 4
  got = siglip_loss(img, txt, np.float32(10.0), np.float32(-3.0), neg, valid)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_token_similarity_is_each_words_best_patch_averaged():
  rng = np.random.RandomState(5)
  img, txt = _normalized(rng, 2 * 3, 4).reshape(2, 3, 4), _normalized(rng, 3 * 5, 4).reshape(3, 5, 4)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  expected = np.zeros((2, 3))
  for i in range(2):
    for t in range(3):
      best = (txt[t].astype(np.float64) @ img[i].T.astype(np.float64)).max(axis=1)  # [L]: each token's best patch
      expected[i, t] = best[mask[t]].mean()
  np.testing.assert_allclose(np.asarray(similarity(img, txt, mask)), expected, rtol=1e-5)
  # own_similarity pairs image i only with its own texts: here texts[i] = all three, so it is the same matrix.
  own = own_similarity(img, np.broadcast_to(txt, (2, 3, 5, 4)), np.broadcast_to(mask, (2, 3, 5)))
  np.testing.assert_allclose(np.asarray(own), expected, rtol=1e-5)
  loss = clip_loss(img, txt[:2], np.float32(10.0), text_mask=mask[:2])
  logits = 10.0 * expected[:, :2]
  idx = np.arange(2)
  reference = -0.5 * (_log_softmax(logits, 1)[idx, idx].mean() + _log_softmax(logits, 0)[idx, idx].mean())
  np.testing.assert_allclose(float(loss), reference, rtol=1e-5)


def test_siglip_loss_matches_numpy():
  rng = np.random.RandomState(2)
  img, txt = _normalized(rng, 4, 6), _normalized(rng, 4, 6)
  logits = 10.0 * img.astype(np.float64) @ txt.T.astype(np.float64) - 3.0
  z = 2 * np.eye(4) - 1
  expected = np.sum(np.log1p(np.exp(-z * logits))) / 4  # -log sigmoid(x) = log(1 + e^-x)
  np.testing.assert_allclose(float(siglip_loss(img, txt, np.float32(10.0), np.float32(-3.0))), expected, rtol=1e-5)
