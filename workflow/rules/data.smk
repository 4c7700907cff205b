# Stage 1: the canonical particle table (simulated into results/simulated, a folder `drgn simulate` owns
# and replaces whole; or imported from RELION / cryoSPARC into results/data) and the Fourier-cropped
# stacks every later stage reads (results/data/particles.{D}.mrcs, one per box size, made once).

if SIMULATED:

    rule simulate_particles:
        output:
            table=TABLE,
            stack=f"{SIM_DIR}/particles.mrcs",
            star=f"{SIM_DIR}/particles.star",
            cs=f"{SIM_DIR}/particles.cs",
            gt=f"{SIM_DIR}/gt.json",
            gt_volumes=directory(f"{SIM_DIR}/gt_volumes"),
        log:
            "logs/simulate/simulate.log",
        benchmark:
            "benchmarks/simulate/simulate.tsv"
        conda:
            "../../envs/cpu.yaml"
        threads: get_threads("simulate")
        resources:
            **get_resources("simulate"),
        params:
            outdir=folder_of_output("table"),
            sim=config["simulate"],
            version=DRGN_VERSION,
        shell:
            "drgn simulate -o {params.outdir} --n {params.sim[n]} -D {params.sim[D]} "
            "--apix {params.sim[apix]} --snr {params.sim[snr]} "
            "--heterogeneity {params.sim[heterogeneity]} --distribution {params.sim[distribution]} "
            "--n-states {params.sim[n_states]} --junk-fraction {params.sim[junk_fraction]} "
            "--seed {params.sim[seed]} --threads {threads} {params.sim[extra]} > {log} 2>&1"

else:

    if EMPIAR:

        # On a cluster this runs on the submit host: compute nodes often have no internet access, and the
        # transfer needs no compute. `drgn fetch` resumes whatever an earlier run left and re-fetches
        # nothing complete, so rerunning this rule is cheap.
        localrules:
            fetch_empiar,

        rule fetch_empiar:
            output:
                **get_fetched_files(),
                done=touch(FETCH_DONE),
            log:
                "logs/fetch/fetch.log",
            benchmark:
                "benchmarks/fetch/fetch.tsv"
            conda:
                "../../envs/cpu.yaml"
            params:
                commands=empiar_mode.fetch_shell(config),
                version=DRGN_VERSION,
            shell:
                "({params.commands}) > {log} 2>&1"

    rule import_particles:
        input:
            source=get_import_source,
            second=get_import_second_files,
            fetched=get_fetch_flag,
        output:
            table=TABLE,
        log:
            "logs/import/import.log",
        benchmark:
            "benchmarks/import/import.tsv"
        conda:
            "../../envs/cpu.yaml"
        threads: get_threads("import")
        resources:
            **get_resources("import"),
        params:
            options=get_import_options(),
            version=DRGN_VERSION,
        shell:
            "drgn import {input.source:q} -o {output.table} {params.options} > {log} 2>&1"


rule downsample:
    input:
        table=TABLE,
    output:
        stack=f"{R}/data/particles.{{D}}.mrcs",
        sidecar=f"{R}/data/particles.{{D}}.json",
    log:
        "logs/downsample/D{D}.log",
    benchmark:
        "benchmarks/downsample/D{D}.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: get_threads("downsample")
    resources:
        **get_resources("downsample"),
    params:
        chunk=config["downsample"]["chunk"],
        float16="--float16" if config["downsample"]["float16"] else "",
        version=DRGN_VERSION,
    shell:
        "drgn downsample {input.table} -D {wildcards.D} -o {output.stack} --chunk {params.chunk} "
        "{params.float16} --max-threads {threads} > {log} 2>&1"
