-- 125_purge_before_takeover.sql: storage whose purge was asked for is erased, never
-- taken over; a row whose storage was taken over is deleted without a teardown.
--
-- instances_take_kept_storage (124_kept_storage_taken.sql) gave a re-created
-- instance the kept storage of a destroyed one even when its purge had been asked
-- for and had not run yet (backing off after a provisioner failure, or not yet
-- claimed): the destroyed row stopped owing destroy_storage, and the data its
-- owner or an operator asked to have erased was mounted into the new instance and
-- kept. And deleting a destroyed row whose storage a live instance had taken over
-- recorded a teardown of its app name (instances_record_teardown), which is the
-- live instance's: the teardown job destroyed its apps and data.
--
-- Now:
-- - instances_take_kept_storage takes only storage whose purge was not asked for
--   (AND NOT x.purge_requested).
-- - A create waits while another row of its app name owes the purge of its
--   storage: lifecycle_target_wait answers 'purge_pending' (the claim skips it and
--   lifecycle_waiting shows why); once the entries are destroyed the instance is
--   created on new, empty ones. Only creates pay for the check (one probe of the
--   small instances_kept_storage_idx).
-- - instances_record_teardown records nothing for a destroyed row whose storage
--   was taken (its apps are gone; its storage is the taker's).
-- - lifecycle_deprovision records no purge that nothing would carry out on a row
--   whose storage was taken: the answer says 'purge': false and names the instance
--   that holds the data ('storage_taken_by'), the one to purge.
--
-- Redefines, each whole from its last definition and unchanged but for the lines
-- named above: public.instances_take_kept_storage (124_kept_storage_taken.sql),
-- public.lifecycle_target_wait (110_claim_backlog.sql),
-- public.instances_record_teardown (100_provisioner_targets.sql) and
-- public.lifecycle_deprovision (060_instance.sql). CREATE OR REPLACE keeps each
-- function's grants.

CREATE OR REPLACE FUNCTION public.instances_take_kept_storage()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        UPDATE public.instances x SET storage_taken_by = NEW.id
         WHERE x.dokku_app_name = NEW.dokku_app_name AND x.id <> NEW.id
           AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
           AND x.storage_taken_by IS NULL AND NOT x.purge_requested
        RETURNING x.id, x.subscription_id
    LOOP
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.storage_taken',
               jsonb_build_object('instance_id', r.id, 'by', NEW.id, 'app', NEW.dokku_app_name)
          FROM public.subscriptions s WHERE s.id = r.subscription_id;
    END LOOP;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION public.lifecycle_target_wait(i public.instances)
RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
DECLARE
    t public.provisioner_targets;
BEGIN
    IF i.owed_action IS NULL OR i.owed_action = 'email' THEN
        RETURN NULL;
    END IF;
    IF i.owed_action = 'create' AND EXISTS (
           SELECT 1 FROM public.instances x
            WHERE x.dokku_app_name = i.dokku_app_name AND x.id <> i.id
              AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
              AND x.storage_taken_by IS NULL AND x.purge_requested) THEN
        RETURN 'purge_pending';
    END IF;
    IF i.target_id IS NULL THEN
        IF i.provisioned_at IS NULL AND i.status <> 'deprovisioned'
           AND EXISTS (SELECT 1 FROM public.provisioner_targets) THEN
            RETURN 'no_capacity';
        END IF;
        RETURN NULL;
    END IF;
    SELECT * INTO t FROM public.provisioner_targets x WHERE x.id = i.target_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NOT t.enabled THEN
        RETURN 'target_disabled';
    END IF;
    IF (SELECT count(*) FROM public.instances b
         WHERE b.target_id = t.id AND b.claimed_by IS NOT NULL
           AND b.claim_expires_at > now()) >= t.max_in_flight THEN
        RETURN 'target_busy';
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE FUNCTION public.instances_record_teardown()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF OLD.dokku_app_name IS NULL
       OR (OLD.status = 'deprovisioned'
           AND (OLD.storage_destroyed_at IS NOT NULL OR OLD.storage_taken_by IS NOT NULL)) THEN
        RETURN OLD;
    END IF;
    INSERT INTO public.instance_teardowns (instance_id, dokku_app_name, subscription_id,
                                           target_id, not_before)
    VALUES (OLD.id, OLD.dokku_app_name, OLD.subscription_id, OLD.target_id,
            -- A step in flight on the row ends (or its lease does) first.
            CASE WHEN OLD.claimed_by IS NOT NULL THEN greatest(now(), OLD.claim_expires_at)
                 ELSE now() END)
    ON CONFLICT (instance_id) DO NOTHING;
    -- No account_id: the account (and the subscription) may be going in this very
    -- statement (the cascade), and audit_logs refers to live accounts only.
    INSERT INTO public.audit_logs (account_id, action, details)
    VALUES (NULL, 'instance.teardown_requested', jsonb_build_object(
        'instance_id', OLD.id, 'app', OLD.dokku_app_name, 'subscription_id', OLD.subscription_id,
        'status', OLD.status, 'target_id', OLD.target_id));
    RETURN OLD;
END;
$$;

CREATE OR REPLACE FUNCTION public.lifecycle_deprovision(p_instance_id uuid, p_subscription_id uuid,
                                             p_mode text, p_purge boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    i public.instances;
    v_sub_status public.subscription_status;
    v_id uuid := p_instance_id;
    v_mode text := p_mode;
BEGIN
    IF p_mode IS NOT NULL AND p_mode NOT IN ('stop', 'destroy') THEN
        RAISE EXCEPTION 'mode must be stop or destroy' USING ERRCODE = '22023';
    END IF;
    IF p_purge AND p_mode IS DISTINCT FROM 'destroy' THEN
        RAISE EXCEPTION 'purge goes with mode destroy' USING ERRCODE = '22023';
    END IF;
    IF v_id IS NULL THEN
        PERFORM 1 FROM public.subscriptions WHERE id = p_subscription_id;
        IF NOT FOUND THEN
            RETURN jsonb_build_object('outcome', 'not_found');
        END IF;
        v_id := coalesce(public.lifecycle_live_instance_id(p_subscription_id),
                         (SELECT id FROM public.instances WHERE subscription_id = p_subscription_id
                           ORDER BY created_at DESC LIMIT 1));
        IF v_id IS NULL THEN
            RETURN jsonb_build_object('outcome', 'none', 'mode', coalesce(v_mode, 'stop'));
        END IF;
    END IF;

    SELECT * INTO i FROM public.instances WHERE id = v_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'not_found');
    END IF;
    IF v_mode IS NULL THEN
        SELECT status INTO v_sub_status FROM public.subscriptions WHERE id = i.subscription_id;
        v_mode := CASE WHEN public.instance_desired_for(v_sub_status) = 'deprovisioned'
                       THEN 'destroy' ELSE 'stop' END;
    END IF;
    i := public.instance_request(v_id, CASE v_mode WHEN 'destroy' THEN 'deprovisioned'::public.instance_status
                                                   ELSE 'stopped'::public.instance_status END);
    IF p_purge AND NOT i.purge_requested AND i.storage_destroyed_at IS NULL
       AND i.storage_taken_by IS NULL THEN
        UPDATE public.instances SET purge_requested = true,
               storage_destroy_after = CASE WHEN status = 'deprovisioned' THEN now()
                                            ELSE storage_destroy_after END
         WHERE id = v_id RETURNING * INTO i;
        INSERT INTO public.audit_logs (account_id, action, details)
        SELECT s.account_id, 'instance.purge_requested',
               jsonb_build_object('instance_id', i.id, 'app', i.dokku_app_name,
                                  'by', coalesce(current_setting('request.jwt.claims', true), '{}')::jsonb ->> 'role')
          FROM public.subscriptions s WHERE s.id = i.subscription_id;
    END IF;
    -- An explicit request lifts a retry backoff or an operator hold on what it asks for.
    IF i.owed_action IN ('stop', 'destroy', 'destroy_storage')
       AND (i.next_attempt_at > now() OR (i.next_attempt_at IS NULL AND i.last_error IS NOT NULL)) THEN
        UPDATE public.instances SET next_attempt_at = now() WHERE id = v_id RETURNING * INTO i;
    END IF;
    RETURN jsonb_build_object('outcome', 'ok', 'mode', v_mode, 'purge', i.purge_requested,
                              'instance', public.lifecycle_instance_json(i))
        || CASE WHEN p_purge AND i.storage_taken_by IS NOT NULL
                THEN jsonb_build_object('storage_taken_by', i.storage_taken_by)
                ELSE '{}'::jsonb END;
END;
$$;
