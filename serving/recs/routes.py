"""Mount the /v1/recs routes on the app (called once at the end of `create_app`)."""

from __future__ import annotations

import os

import falcon

from serving.config import ServingConfig
from serving.events_log import EventLogs
from serving.recs.events import EventResource, EventsResource, FeedbackResource
from serving.recs.experiments import ExperimentsResource
from serving.recs.rerank import RerankExplainResources
from serving.recs.runtime import RuntimeResources
from serving.recs.seeds import SeedResource, SeedStore


def register(
    app: falcon.App,
    config: ServingConfig,
    *,
    service,
    store,
    tenant_store,
    event_logs: EventLogs | None = None,
) -> EventLogs:
    """Add every /v1/recs route to `app`; returns the event logs (tests flush through it)."""
    if event_logs is None:
        event_logs = EventLogs(
            config.data_root,
            config.events_flush_s,
            config.events_segment_bytes,
            config.events_linger_ms / 1000,
        )
    events = EventsResource(event_logs)
    app.add_route("/v1/recs/events", events)
    app.add_route("/v1/recs/events/bulk", events, suffix="bulk")
    app.add_route("/v1/recs/events/{event_id}", EventResource(event_logs))
    feedback = FeedbackResource(config.data_root)
    app.add_route("/v1/recs/feedback", feedback)
    app.add_route("/v1/recs/feedback/{feedback_id}", feedback, suffix="one")
    rt = RuntimeResources(service, store, config.deadline_ms)
    app.add_route("/v1/recs/predict", rt, suffix="predict")
    app.add_route("/v1/recs/users/{user_id}", rt, suffix="user")
    app.add_route("/v1/recs/users/{user_id}/realtime", rt, suffix="realtime")
    app.add_route("/v1/recs/batch/predict", rt, suffix="batch")
    app.add_route("/v1/recs/item/{item_id}/related", rt, suffix="related")
    app.add_route("/v1/recs/score", rt, suffix="score")
    app.add_route("/v1/recs/embeddings/search", rt, suffix="search")
    app.add_route("/v1/recs/embeddings/{embedding_id}", rt, suffix="embedding")

    from serving.experiments import ExperimentStore

    serving_dir = os.path.join(config.data_root, "serving")
    experiments = ExperimentStore(
        os.path.join(serving_dir, "experiments"), store, config.snapshot_check_s
    )
    seeds = SeedStore(os.path.join(serving_dir, "seeds"), config.snapshot_check_s)
    # The hooks RecommendService consults (running experiment of a surface; cold-start seeds).
    service.experiments = experiments
    service.seeds = seeds
    exp = ExperimentsResource(experiments, event_logs)
    app.add_route("/v1/recs/experiments", exp)
    app.add_route("/v1/recs/experiments/{experiment_id}", exp, suffix="one")
    app.add_route("/v1/recs/experiments/{experiment_id}/assign", exp, suffix="assign")
    app.add_route("/v1/recs/experiments/{experiment_id}/assignment", exp, suffix="assignment")
    app.add_route("/v1/recs/experiments/{experiment_id}/results", exp, suffix="results")
    rx = RerankExplainResources(service, store, tenant_store, config.deadline_ms)
    app.add_route("/v1/recs/rerank", rx, suffix="rerank")
    app.add_route("/v1/recs/explain", rx, suffix="explain")
    seed = SeedResource(seeds)
    app.add_route("/v1/recs/seed", seed)
    app.add_route("/v1/recs/seed/{surface}", seed, suffix="one")

    from serving.crr import register as register_crr

    register_crr(app, config, service=service, store=store, event_logs=event_logs)
    return event_logs
