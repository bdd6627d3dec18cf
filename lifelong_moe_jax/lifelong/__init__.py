"""Lifelong-MoE: expert expansion, partial freezing, distillation and baseline penalties.

Modules (see docs/lifelong.md): ``phase_record`` (which phase owns which expert slices),
``surgery`` (grow E -> E + N experts: params, router, optimizer state), ``freeze`` (exactly zero
updates for old experts), ``distill`` (distillation from the previous phase's model) and
``penalties`` (L2 / EWC anchors, diagonal Fisher).
"""
