"""The encoder. `encoder.build_model` builds a timm backbone, the projection head (`head`, with
BatchNorm per view chunk from `sync_batchnorm`) and StableRep++'s optional text tower (`text`).

Import from the submodules: importing this package stays cheap (timm and open_clip load only
with `encoder`/`text`), which matters for spawned worker processes.
"""
