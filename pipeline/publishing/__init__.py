"""What a published variant carries beside its weights: the manifest built from the stages'
results (``manifest``), serving profiles per engine (``serving``), the model card
(``model_card``) and deployment files (``deploy``). ``pipeline.storage`` writes and reads these as
files; only this package knows the stages they come from."""
