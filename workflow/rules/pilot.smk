# Stage 2: pilot training on downsampled images with small networks, one independent job per latent
# dimension (the paper's zdim 1 and zdim 10 pilots), whose latents the filter reads.


rule train_pilot:
    input:
        table=TABLE,
        stack=get_stack(PILOT_D),
    output:
        **get_run_outputs(f"{R}/pilot/z{{zdim}}"),
        curve=report(
            f"{R}/pilot/z{{zdim}}/learning_curve.png",
            caption="../report/pilot_curve.rst",
            category="1. Pilot training",
            labels={"pilot": "zdim {zdim}", "figure": "learning curve"},
        ),
    log:
        "logs/pilot/z{zdim}.log",
    benchmark:
        "benchmarks/pilot/z{zdim}.tsv"
    conda:
        "../../envs/gpu.yaml"
    threads: get_threads("pilot")
    resources:
        **get_resources("pilot"),
    params:
        run=folder_of_output("model"),
        t=config["pilot"]["train"],
        val_frac=config["pilot"]["val_frac"],
        device=config["device"],
        version=DRGN_VERSION,
    shell:
        "drgn train {input.table} {input.stack} -o {params.run} --auto-resume --zdim {wildcards.zdim} "
        "--epochs {params.t[epochs]} --enc-dim {params.t[enc_dim]} --enc-layers {params.t[enc_layers]} "
        "--dec-dim {params.t[dec_dim]} --dec-layers {params.t[dec_layers]} "
        "--batch-size {params.t[batch_size]} --lr {params.t[lr]} --seed {params.t[seed]} "
        "--val-frac {params.val_frac} --device {params.device} --threads {threads} "
        "{params.t[extra]} > {log} 2>&1"
