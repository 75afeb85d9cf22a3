-- 151_token_ref_names_a_token.sql: a provisioner target's token reference names a
-- provisioner token, never another secret of the worker.
--
-- The worker sends the value its target's token_ref names as the bearer token of
-- every call to that target's URL. token_ref could name any variable of the
-- worker's environment or any file it can read, so whoever may write
-- provisioner_targets (service_role) could have the worker send its other secrets
-- (env:MINDROOM_SECRETS_KEY, which opens every instance's sealed secrets,
-- env:STRIPE_SECRET_KEY, env:DATABASE_URL with its password; file:/proc/self/environ)
-- to a URL of their choosing. Now a reference names a variable whose name ends in
-- _TOKEN (DOKKU_PROVISIONER_TOKEN, CLUSTER_1_TOKEN) or a file whose name ends in
-- .token (/etc/mindroom/cluster-1.token); service_role cannot change the table's
-- constraints.
--
-- A target registered before with another reference stops this migration, named:
-- rename its variable or file, update token_ref, and migrate again.

DO $$
DECLARE
    v_names text;
BEGIN
    SELECT string_agg(t.name || ' (' || t.token_ref || ')', ', ' ORDER BY t.id) INTO v_names
      FROM public.provisioner_targets t
     WHERE t.token_ref !~ '^(env:[A-Z_][A-Z0-9_]{0,93}_TOKEN|file:/[A-Za-z0-9._/-]{0,244}\.token)$';
    IF v_names IS NOT NULL THEN
        RAISE EXCEPTION 'provisioner targets whose token reference names no *_TOKEN variable or *.token file: %', v_names
            USING HINT = 'rename the variable or file, UPDATE public.provisioner_targets SET token_ref = ..., and migrate again';
    END IF;
END;
$$;

ALTER TABLE public.provisioner_targets
    DROP CONSTRAINT provisioner_targets_token_ref_check,
    ADD CONSTRAINT provisioner_targets_token_ref_check
        CHECK (token_ref ~ '^(env:[A-Z_][A-Z0-9_]{0,93}_TOKEN|file:/[A-Za-z0-9._/-]{0,244}\.token)$');
