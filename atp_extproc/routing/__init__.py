"""Learned routing: objectives, online estimates, Thompson sampling within hard limits,
breakers, shadow decisions and mirrors, quality feedback, savings report.

Modules, one job each:
    settings    objective: / ledger: config blocks and their cross-reference check
    estimates   per-(route, model) latency, error, cost, quality with change restarts
    sketch      decaying log-bucket latency histogram (p95)
    sampling    batched numpy draws for the decision path
    selection   one decision's scoring: Thompson + greedy within limits; records
    sticky      weighted rendezvous hashing for tenant/user stickiness
    breaker     per-candidate circuit breaker
    state       per-route state: arms, route priors, prepared candidate lists
    router      choose / observe: the API the exchange calls
    feedback    quality feedback by request id, finish_reason proxy
    report      the savings report over the ledger (store/)
    simulate    network-free simulation and regret
    bench       decision-time benchmark

Import from the submodules (e.g. `from atp_extproc.routing.router import Router`): this
package imports nothing itself, so `config` can import `routing.settings` without
pulling numpy in.
"""
