"""The training pipeline on a synthetic frame: reproducible, no leak, calibrated, same scores as serving."""

import numpy as np
import pandas as pd
import pytest
import torch

from models.evaluate import holdout_split, metrics_row, score_frame
from models.metrics import group_metrics
from models.mind import Replay
from models.ranker import AD_SCALARS, request_features
from models.train import TrainConfig, sort_requests, train
from models.two_tower import CpuUserTower, TwoTowerConfig, encode_users, to_tensors
from tests.support.models import synthetic_world


@pytest.fixture(scope="module")
def trained(synthetic_frame):
    tower = TwoTowerConfig(item_buckets=4096, attribute_buckets=512, category_buckets=64, epochs=3, batch_size=64)
    config = TrainConfig(seed=7, tower=tower, num_boost_round=150)
    history, holdout = holdout_split(synthetic_frame)
    bundle, report = train(history, config)
    return config, history, sort_requests(holdout), bundle, report


def test_learns_the_signal_and_is_calibrated(trained):
    _, _, holdout, bundle, _ = trained
    emb, probs = score_frame(bundle, holdout)
    row = metrics_row(holdout, probs, probs)
    assert row["group_auc"] > 0.65  # clicks follow category preference and ad quality
    assert group_metrics(holdout.request_id, holdout.label, emb)["group_auc"] > 0.55
    assert row["ece"] < 0.05
    assert probs.mean() == pytest.approx(holdout.label.mean(), abs=0.04)
    assert np.all((probs > 0) & (probs < 1))


def test_trees_learn_from_the_towers_requests_too(trained):
    """By default the trees learn from every request before early stopping (the tower's with no embedding
    score), not only from their own slice; the embedding score's splits still come from out-of-sample rows."""
    _, _, _, bundle, report = trained
    rows = report["rows"]
    assert report["tree_learning_rows"] == rows["tower"] + rows["trees"]
    assert "embedding_score" in bundle.feature_names


def test_same_seed_same_predictions(trained):
    config, history, holdout, bundle, _ = trained
    again, _ = train(history, config)
    np.testing.assert_array_equal(score_frame(bundle, holdout)[1], score_frame(again, holdout)[1])
    np.testing.assert_array_equal(bundle.ad_matrix, again.ad_matrix)


def test_shuffled_labels_give_chance_auc(trained):
    """Clicks shuffled in the stream itself: features built from them carry nothing, unless a row leaks its own."""
    config = trained[0]
    news, impressions = synthetic_world(seed=4)
    labels = np.random.default_rng(1).permutation([y for imp in impressions for y in imp.labels])
    start = 0
    for imp in impressions:
        imp.labels = labels[start : start + len(imp.labels)].tolist()
        start += len(imp.labels)
    history, holdout = holdout_split(Replay(news).run(impressions))
    bundle, _ = train(history, config)
    _, probs = score_frame(bundle, sort_requests(holdout))
    holdout = sort_requests(holdout)
    assert abs(group_metrics(holdout.request_id, holdout.label, probs)["group_auc"] - 0.5) < 0.06


def test_predict_ctr_per_request_equals_batch_scoring(trained):
    _, _, holdout, bundle, _ = trained
    emb_all, probs_all = score_frame(bundle, holdout)
    rows = holdout.index[holdout.request_id == holdout.request_id.iloc[-1]]
    request = holdout.loc[rows]
    user = request.iloc[0].to_dict()
    user_vec = bundle.user_vector(user)
    ad_vecs = bundle.embed_ads(request)
    emb = ad_vecs @ user_vec
    np.testing.assert_allclose(emb, emb_all[rows], rtol=1e-5, atol=1e-6)
    ads = request[["ad_id", "category", "campaign_id", "position", *AD_SCALARS, "ad_last_seen_ms"]]
    context = {"ts_ms": int(user["ts"]), "hour": user["hour"], "slate_size": user["slate_size"]}
    np.testing.assert_allclose(bundle.predict_ctr(user, ads, context, emb), probs_all[rows], rtol=1e-6)


def test_serving_skips_only_features_no_tree_reads(trained):
    """predict_ctr leaves out the features the trees never split on: same margins, same read columns."""
    _, _, holdout, bundle, _ = trained
    unread = bundle.unread_features()
    assert unread and bundle.offset_feature not in unread and unread < set(bundle.feature_names)
    splits = dict(zip(bundle.feature_names, bundle.booster.feature_importance("split"), strict=True))
    assert all(splits[name] == 0 for name in unread)
    for _, request in list(holdout.groupby("request_id", sort=False))[:20]:
        user = request.iloc[0].to_dict()
        ads = request[["ad_id", "category", "campaign_id", "position", *AD_SCALARS, "ad_last_seen_ms"]]
        context = {"ts_ms": int(user["ts"]), "hour": user["hour"], "slate_size": user["slate_size"]}
        emb = np.linspace(-1, 1, len(request))
        full = request_features(user, ads, context, emb, bundle.feature_names)
        lean = request_features(user, ads, context, emb, bundle.feature_names, skip=unread)
        read = [j for j, name in enumerate(bundle.feature_names) if name not in unread]
        np.testing.assert_array_equal(lean[:, read], full[:, read])
        np.testing.assert_array_equal(bundle.predict_margin(lean), bundle.predict_margin(full))


def test_vectors_are_unit_length_and_batch_one_matches_batch(trained):
    _, _, holdout, bundle, _ = trained
    users = holdout.drop_duplicates("request_id").head(8).to_dict("records")
    batch = bundle.user_vectors(users)
    np.testing.assert_allclose(bundle.user_vector(users[3]), batch[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(bundle.ad_matrix, axis=1), 1.0, rtol=1e-5)
    assert bundle.ad_matrix.dtype == np.float32 and bundle.ad_matrix.shape[0] == len(bundle.ad_ids)
    top, scores = bundle.nearest(batch[0], 5)
    np.testing.assert_allclose(scores, np.sort(bundle.ad_matrix @ batch[0])[::-1][:5], rtol=1e-6)
    np.testing.assert_allclose(bundle.ad_matrix[top] @ batch[0], scores, rtol=1e-6)


def test_numpy_user_tower_equals_torch(trained):
    """Serving's CPU forward (numpy) gives the torch tower's vectors, empty histories and unknown users included."""
    _, _, holdout, bundle, _ = trained
    users = [*holdout.drop_duplicates("request_id").head(16).to_dict("records"), {}, {"recent_items": ["x"]}]
    inputs = encode_users(users, bundle.tower.config)
    with torch.inference_mode():
        expected = bundle.tower.user_tower(to_tensors(inputs, torch.device("cpu"))).numpy()
    numpy_tower = CpuUserTower(bundle.tower)
    got = numpy_tower(inputs)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    one = np.stack([numpy_tower.one(user, bundle.tower.config) for user in users])  # serving's batch of one
    assert one.dtype == np.float32
    np.testing.assert_allclose(one, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bundle.user_vectors(users), expected, rtol=1e-5, atol=1e-6)


def test_unseen_ad_gets_a_vector_from_its_attributes(trained):
    _, _, _, bundle, _ = trained
    known = bundle.embed_ads({"ad_id": ["never-seen-1", "never-seen-2"], "category": ["c1", "c1"],
                              "campaign_id": ["s1-0", "s1-0"]})  # fmt: skip
    assert np.all(np.isfinite(known)) and np.allclose(np.linalg.norm(known, axis=1), 1.0, rtol=1e-5)
    assert float(known[0] @ known[1]) > 0.9  # same attributes, unseen ids: nearly the same vector
    empty = bundle.predict_ctr({}, {"ad_id": ["x", "y"]}, {"ts_ms": 0}, np.zeros(2))  # nothing known at all
    assert empty.shape == (2,) and np.all(np.isfinite(empty))


def test_a_feast_shaped_frame_trains_and_scores_the_same(synthetic_frame):
    """Feast gives list features as numpy arrays, a missing row as NaN and times as datetimes."""
    config = TrainConfig(seed=5, tower=TwoTowerConfig(item_buckets=1024, attribute_buckets=128, category_buckets=32,
                                                      epochs=1, batch_size=64), num_boost_round=30)  # fmt: skip
    frame = synthetic_frame.head(3000)
    feast = frame.copy()
    for column in ("recent_items", "recent_categories", "top_categories", "freq_ad_ids", "freq_ad_clicks_24h"):
        feast[column] = [np.asarray(v) for v in feast[column]]
    first = feast["impressions_total"] == 0  # users without a row yet: Feast's join leaves NaN / None
    feast.loc[first, ["impressions_total", "clicks_total", "ad_click_7d"]] = np.nan
    feast["event_timestamp"] = pd.to_datetime(feast.pop("ts"), unit="ms", utc=True)
    plain, _ = train(frame, config)
    shaped, _ = train(feast, config)
    tail = frame.tail(300)
    feast_tail = feast.tail(300)
    np.testing.assert_allclose(score_frame(shaped, feast_tail)[1], score_frame(plain, tail)[1], rtol=1e-9)
