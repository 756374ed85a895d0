"""Build training data: grow it with a teacher (Self-Instruct, Evol-Instruct, augmentation), then clean and
select it (dedup, filter, IFD selection). Each step reads and writes alpaca-style JSONL that `data/` loads like
any other file, and returns a StepReport. Import the step modules directly; this package imports nothing heavy.

    from tunesmith.datagen.self_instruct import self_instruct, SelfInstructOptions
    from tunesmith.datagen.teacher import TeacherSpec, make_teacher
"""
