# Stage 4: the final model, trained on the particles the filter kept (their canonical rows, --ind), at a
# larger box and with larger networks, holding out a random fraction for the validation loss.
# highres.processes > 1 trains data-parallel on one node (`drgn train --nproc P`: torchrun, one process per
# GPU); highres.nodes > 1 asks SLURM for N nodes with G GPUs each and starts one `drgn train --nproc P
# --nnodes N` per node with srun (the rendezvous is the job's first node).


rule train_highres:
    input:
        table=TABLE,
        stack=get_stack(HIGH_D),
        kept=f"{FILTER}/kept.npy",
    output:
        **get_run_outputs(HIGHRES),
        curve=report(
            f"{HIGHRES}/learning_curve.png",
            caption="../report/highres_curve.rst",
            category="3. High-resolution training",
            labels={"figure": "learning curve"},
        ),
    log:
        "logs/highres/train.log",
    benchmark:
        "benchmarks/highres/train.tsv"
    conda:
        "../../envs/gpu.yaml"
    threads: get_threads("highres")
    resources:
        **highres_resources(),
    params:
        run=folder_of_output("model"),
        zdim=config["highres"]["zdim"],
        t=config["highres"]["train"],
        val_frac=config["highres"]["val_frac"],
        device=config["device"],
        launch=highres_launch()[0],
        procs=highres_launch()[1],
        # each process its share of the job's threads
        threads=lambda wildcards, threads: max(
            1, threads // config["highres"]["processes"]
        ),
        version=DRGN_VERSION,
    shell:
        "{params.launch}drgn train {input.table} {input.stack} -o {params.run} --auto-resume --zdim {params.zdim} "
        "--ind {input.kept} "
        "--epochs {params.t[epochs]} --enc-dim {params.t[enc_dim]} --enc-layers {params.t[enc_layers]} "
        "--dec-dim {params.t[dec_dim]} --dec-layers {params.t[dec_layers]} "
        "--batch-size {params.t[batch_size]} --lr {params.t[lr]} --seed {params.t[seed]} "
        "--val-frac {params.val_frac} --device {params.device} --threads {params.threads} {params.procs} "
        "{params.t[extra]} > {log} 2>&1"
