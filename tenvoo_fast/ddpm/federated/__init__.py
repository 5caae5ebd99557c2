"""Federated fine-tuning of adapters on Flower (``tenvoo-fast federated``): the aggregation
schemes (:mod:`.aggregation`), what crosses the wire (:mod:`.wire`), each client's data
(:mod:`.clients`), a round's work on either side (:mod:`.rounds`), the Flower server and client
apps (:mod:`.flower_app`), the run folder (:mod:`.record`) and the command (:mod:`.command`)."""
