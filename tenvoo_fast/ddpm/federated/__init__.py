"""Federated fine-tuning of adapters (issue 18, in progress): the aggregation schemes
(:mod:`.aggregation`) and what crosses the wire (:mod:`.wire`). The Flower server and clients
and ``tenvoo-fast federated`` come next."""
