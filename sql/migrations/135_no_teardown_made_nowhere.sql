-- 135_no_teardown_made_nowhere.sql: deleting an instance that was never made anywhere
-- records no teardown; deleting the data it took over never orphans that data.
--
-- An instance inserted while targets existed and none had room has nothing on any
-- provisioner until it is placed (public.instance_nowhere, 130_waiting_for_room.sql
-- and 133_made_nowhere_yet.sql): its stop or destroy is done by the claim, calling
-- nobody, because it would otherwise go to DOKKU_PROVISIONER_URL, a host that may not
-- exist once targets do. Deleting its row (the account erased while it waited for
-- room, or while it was paused before it was ever placed) still recorded a teardown
-- (instances_record_teardown), with target_id NULL: the teardown job sent DELETE
-- /apps/{app}?purge=true to DOKKU_PROVISIONER_URL about apps never made anywhere, and
-- retried it with backoff for good where nothing answers there. Now:
--   * such a row records no teardown; its delete is audited
--     'instance.teardown_skipped' ("made": false) instead of
--     'instance.teardown_requested';
--   * a waiting instance that took over a destroyed instance's kept storage on
--     DOKKU_PROVISIONER_URL (both without a target: instances_take_kept_storage) is
--     not "nowhere": that data is where its apps would be made, and its own teardown
--     erases it. The destroyed row records none (its storage was taken). But
--     instance_nowhere learns of the takeover from the destroyed row, which an
--     account's cascade may delete first: the instance then looked "nowhere" and
--     nobody erased the data. Now a destroyed row whose storage was taken records
--     its teardown itself when its taker would be "nowhere" once this row is gone
--     (public.instance_nowhere(i, p_gone)): the taker never mounted it, so the data
--     is still this row's. Whatever order the rows go in, one teardown of the data
--     is recorded: the taker's while the destroyed row is there, else the row's.
--
-- Adds public.instance_nowhere(public.instances, uuid): instance_nowhere as if the
-- row p_gone were already deleted. Redefines public.instance_nowhere(public.instances)
-- (133_made_nowhere_yet.sql) as that function with no row gone (its body moves there,
-- unchanged but for the x.id IS DISTINCT FROM p_gone condition), and
-- public.instances_record_teardown (125_purge_before_takeover.sql), whole and
-- unchanged but for v_taker and v_made, the block that decides them (the
-- storage_taken_by condition moves into it) and the audit row's action and "made".
-- CREATE OR REPLACE keeps each redefined function's grants.

-- Whether nothing of the instance exists on any provisioner, once the row p_gone is
-- gone (NULL: none): see instance_nowhere(public.instances) below.
CREATE FUNCTION public.instance_nowhere(i public.instances, p_gone uuid)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
    RETURN i.target_id IS NULL AND i.provisioned_at IS NULL AND i.placement_waited
       AND EXISTS (SELECT 1 FROM public.provisioner_targets)
       AND NOT EXISTS (SELECT 1 FROM public.instances x
                        WHERE x.subscription_id = i.subscription_id AND x.storage_taken_by = i.id
                          AND x.id IS DISTINCT FROM p_gone);
END;
$$;
REVOKE ALL ON FUNCTION public.instance_nowhere(public.instances, uuid) FROM PUBLIC, anon, authenticated;

-- Whether nothing of the instance exists on any provisioner: targets exist, it was
-- inserted while none had room (placement_waited) and has been neither placed nor
-- provisioned since, and it took over no destroyed instance's kept storage (rows of
-- its subscription name it in storage_taken_by).
CREATE OR REPLACE FUNCTION public.instance_nowhere(i public.instances)
RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path = ''
AS $$
BEGIN
    RETURN public.instance_nowhere(i, NULL);
END;
$$;

CREATE OR REPLACE FUNCTION public.instances_record_teardown()
RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_taker public.instances;
    v_made boolean := true;
BEGIN
    IF OLD.dokku_app_name IS NULL
       OR (OLD.status = 'deprovisioned' AND OLD.storage_destroyed_at IS NOT NULL) THEN
        RETURN OLD;
    END IF;
    IF OLD.status = 'deprovisioned' AND OLD.storage_taken_by IS NOT NULL THEN
        -- Its apps are gone and its storage is the taker's, which the taker's own
        -- teardown erases, unless the taker was never made anywhere: once this row
        -- is gone it would look "nowhere" and record none, so this row does (in a
        -- cascade either may go first). A taker already deleted saw this row.
        SELECT * INTO v_taker FROM public.instances x WHERE x.id = OLD.storage_taken_by;
        IF NOT FOUND OR NOT public.instance_nowhere(v_taker, OLD.id) THEN
            RETURN OLD;
        END IF;
    ELSE
        -- Nothing of it exists on any provisioner: nothing to tear down (the
        -- teardown would go to DOKKU_PROVISIONER_URL about apps never made).
        v_made := NOT public.instance_nowhere(OLD);
    END IF;
    IF v_made THEN
        INSERT INTO public.instance_teardowns (instance_id, dokku_app_name, subscription_id,
                                               target_id, not_before)
        VALUES (OLD.id, OLD.dokku_app_name, OLD.subscription_id, OLD.target_id,
                -- A step in flight on the row ends (or its lease does) first.
                CASE WHEN OLD.claimed_by IS NOT NULL THEN greatest(now(), OLD.claim_expires_at)
                     ELSE now() END)
        ON CONFLICT (instance_id) DO NOTHING;
    END IF;
    -- No account_id: the account (and the subscription) may be going in this very
    -- statement (the cascade), and audit_logs refers to live accounts only.
    INSERT INTO public.audit_logs (account_id, action, details)
    VALUES (NULL, CASE WHEN v_made THEN 'instance.teardown_requested'
                       ELSE 'instance.teardown_skipped' END,
            jsonb_build_object(
        'instance_id', OLD.id, 'app', OLD.dokku_app_name, 'subscription_id', OLD.subscription_id,
        'status', OLD.status, 'target_id', OLD.target_id, 'made', v_made));
    RETURN OLD;
END;
$$;
