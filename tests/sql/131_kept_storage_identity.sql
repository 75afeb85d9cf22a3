-- 131_kept_storage_identity.sql: kept storage is taken over only where the new
-- instance is; an instance that waited for room and is placed elsewhere gives back
-- what it took; the step of an instance that took storage over names the homeserver
-- keys and server_name found there (131_kept_storage_identity.sql).
BEGIN;
\ir _helpers.inc
SELECT plan(12);

INSERT INTO auth.users (id, email) VALUES ('13100000-0000-4000-8000-000000000001', 'kept131@example.com');
INSERT INTO public.subscriptions (id, account_id, stripe_price_id, tier, status)
SELECT ('131000a' || n || '-0000-4000-8000-000000000000')::uuid, '13100000-0000-4000-8000-000000000001',
       'price_starter', 'starter', 'active'
  FROM generate_series(1, 4) n;
CREATE FUNCTION pg_temp.sub(n integer) RETURNS uuid LANGUAGE sql AS $$
    SELECT ('131000a' || n || '-0000-4000-8000-000000000000')::uuid $$;
-- A destroyed instance of subscription n whose data is kept on DOKKU_PROVISIONER_URL
-- (no target: provisioned before targets existed, not adopted).
CREATE FUNCTION pg_temp.kept_on_legacy(n integer) RETURNS void LANGUAGE sql AS $$
    INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain, status, desired_status,
                                  provisioned_at, deprovisioned_at, storage_destroy_after)
    SELECT pg_temp.sub(n), x.dokku_app_name, x.subdomain, 'deprovisioned', 'deprovisioned',
           now() - interval '30 days', now() - interval '1 day', now() + interval '29 days'
      FROM public.instance_names(pg_temp.sub(n)) x;
    -- (the insert placed it: targets exist now)
    UPDATE public.instances SET target_id = NULL WHERE subscription_id = pg_temp.sub(n);
$$;
CREATE FUNCTION pg_temp.old(n integer) RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = pg_temp.sub(n) AND status = 'deprovisioned' $$;
CREATE FUNCTION pg_temp.new(n integer) RETURNS public.instances LANGUAGE sql AS $$
    SELECT * FROM public.instances WHERE subscription_id = pg_temp.sub(n) AND status <> 'deprovisioned' $$;

-- 1. Re-created on a target while its data is kept on the old host -------------------
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (1311, 'roomy', 'http://10.0.13.1:8002', 'env:ROOMY_TOKEN', 1000000);
SELECT pg_temp.kept_on_legacy(1);
DO $$ BEGIN PERFORM public.lifecycle_provision(pg_temp.sub(1)); END $$;
SELECT is((pg_temp.new(1)).target_id, 1311::bigint, 'the new instance is placed on the target');
SELECT is((pg_temp.old(1)).storage_taken_by, NULL,
          'it does not take over the storage kept on the old host, which it does not mount');
SELECT is((pg_temp.old(1)).owed_action::text, 'destroy_storage',
          'data kept on the old host is still owed its destruction');

-- 2. Re-created while no target has room, then placed --------------------------------
UPDATE public.provisioner_targets SET capacity_mb = 1 WHERE id = 1311;
SELECT pg_temp.kept_on_legacy(2);
DO $$ BEGIN PERFORM public.lifecycle_provision(pg_temp.sub(2)); END $$;
SELECT is((pg_temp.old(2)).storage_taken_by, (pg_temp.new(2)).id,
          'while it waits for room, the new instance holds the storage kept where it is');
UPDATE public.provisioner_targets SET capacity_mb = 1000000 WHERE id = 1311;
SELECT is(public.instance_place((pg_temp.new(2)).id), 1311::bigint, 'then it is placed on the target');
SELECT is((pg_temp.old(2)).owed_action::text, 'destroy_storage',
          'and the storage left on the old host is owed its destruction again');
SELECT is((SELECT count(*) FROM public.audit_logs WHERE action = 'instance.storage_released'
            AND details ->> 'instance_id' = (pg_temp.old(2)).id::text), 1::bigint,
          'audited as given back');

-- 3. The old host registered as a target (--adopt): nothing moves ---------------------
UPDATE public.provisioner_targets SET capacity_mb = 1 WHERE id = 1311;
SELECT pg_temp.kept_on_legacy(3);
DO $$ BEGIN PERFORM public.lifecycle_provision(pg_temp.sub(3)); END $$;
INSERT INTO public.provisioner_targets (id, name, url, token_ref, capacity_mb)
VALUES (1312, 'host-1', 'http://10.0.13.2:8002', 'env:HOST1_TOKEN', 1000000);
UPDATE public.instances SET target_id = 1312
 WHERE subscription_id = pg_temp.sub(3) AND target_id IS NULL
   AND (status <> 'deprovisioned' OR storage_destroyed_at IS NULL);
SELECT is((pg_temp.old(3)).storage_taken_by, (pg_temp.new(3)).id,
          'adopted together, the new instance still holds the storage it mounts');
SELECT is((pg_temp.old(3)).owed_action, NULL, 'which the old row does not owe');

-- 4. The step of an instance that took storage over -----------------------------------
-- (lifecycle_step_json is lifecycle_claim's: run as its owner.)
CREATE TEMP TABLE ids (k text PRIMARY KEY, id uuid);
CREATE FUNCTION pg_temp.id(p_k text) RETURNS uuid LANGUAGE sql AS $$ SELECT id FROM ids WHERE k = p_k $$;
CREATE FUNCTION pg_temp.destroyed(p_id uuid) RETURNS void LANGUAGE sql AS $$
    SELECT public.lifecycle_deprovision(p_id, NULL, 'destroy', false);
    UPDATE public.instances SET status = 'deprovisioning' WHERE id = p_id;
    UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now(),
           storage_destroy_after = now() + interval '30 days' WHERE id = p_id;
$$;
CREATE FUNCTION pg_temp.keys(p_id uuid, p_tag text) RETURNS void LANGUAGE sql AS $$
    INSERT INTO public.instance_secrets (instance_id, kind, name, ciphertext, digest)
    SELECT p_id, 'homeserver', n, 'mrs1:00000000:' || p_tag || '-' || n, 'mrd1:00000000:' || n
      FROM unnest(ARRAY['signing_key', 'registration_shared_secret', 'macaroon_secret_key',
                        'form_secret']) n;
$$;
CREATE FUNCTION pg_temp.step(p_id uuid) RETURNS jsonb LANGUAGE sql AS $$
    SELECT public.lifecycle_step_json(i) FROM public.instances i WHERE i.id = p_id $$;
-- A ran (its keys, its name recorded) and was destroyed; B took its storage and was
-- destroyed before its first create; C takes B's.
INSERT INTO ids SELECT 'a', (public.lifecycle_provision(pg_temp.sub(4)) #>> '{instance,id}')::uuid;
UPDATE public.instances SET status = 'running', matrix_server_name = 'm131-old.example.org'
 WHERE id = pg_temp.id('a');
SELECT pg_temp.keys(pg_temp.id('a'), 'a');
SELECT pg_temp.destroyed(pg_temp.id('a'));
INSERT INTO ids SELECT 'b', (public.lifecycle_provision(pg_temp.sub(4)) #>> '{instance,id}')::uuid;
SELECT pg_temp.destroyed(pg_temp.id('b'));
INSERT INTO ids SELECT 'c', (public.lifecycle_provision(pg_temp.sub(4)) #>> '{instance,id}')::uuid;
UPDATE public.instances SET claim_action = 'create', claimed_by = 'tok' WHERE id = pg_temp.id('c');
SELECT is(pg_temp.step(pg_temp.id('c')) -> 'predecessor',
          jsonb_build_object('instance_id', pg_temp.id('a'), 'homeserver', jsonb_build_object(
              'signing_key', 'mrs1:00000000:a-signing_key',
              'registration_shared_secret', 'mrs1:00000000:a-registration_shared_secret',
              'macaroon_secret_key', 'mrs1:00000000:a-macaroon_secret_key',
              'form_secret', 'mrs1:00000000:a-form_secret')),
          'C''s first create carries the homeserver keys of the instance whose data it mounts');
SELECT is(pg_temp.step(pg_temp.id('c')) #>> '{payload,homeserver,server_name}', 'm131-old.example.org',
          'and the name that homeserver was recorded under');
SELECT pg_temp.keys(pg_temp.id('c'), 'c');
SELECT is(pg_temp.step(pg_temp.id('c')) -> 'predecessor', 'null'::jsonb,
          'once C has keys of its own, its steps carry nobody else''s');

SELECT * FROM finish();
ROLLBACK;
