-- 179_kept_storage_one_subscription.sql: an instance is never made under names whose
-- data another subscription keeps.
--
-- An instance's names come from the first 12 hexadecimal digits (48 bits) of its
-- subscription's id (public.instance_names), and Dokku keeps an app's storage under
-- its name. Two subscriptions may share those digits (among a million, about 1 in 500
-- that some two do). While the first one's instance lives, the second's cannot be made
-- (instances_dokku_app_name_live: 23505). Once it was destroyed with its data kept,
-- nothing stopped the second's: it took that data over (instances_take_kept_storage
-- matches by name), with the first customer's homeserver keys and operator variables,
-- and its apps mounted the first customer's entries on the host.
--
-- Now the insert of an instance whose names hold another subscription's kept data
-- (destroyed, its storage neither destroyed nor taken over, nor to be purged: a purge
-- already makes a new instance of those names wait for it, then start on new, empty
-- entries, lifecycle_target_wait's 'purge_pending') fails as the live case does, 23505: provision-instance answers 409 conflict ("the instance names of this
-- subscription are still taken", lifecycle_provision), the webhook 500 and logs it
-- (Stripe delivers again; once the data is destroyed, at the end of its retention or
-- by a purge, the instance is made on new storage). The same subscription's new
-- instance still takes its own kept data over.
--
-- SECURITY DEFINER: whoever inserts must not miss another account's row to RLS.

CREATE FUNCTION public.instances_names_not_anothers()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.instances x
                WHERE x.dokku_app_name = NEW.dokku_app_name
                  AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
                  AND x.storage_taken_by IS NULL AND NOT x.purge_requested
                  AND x.subscription_id <> NEW.subscription_id) THEN
        RAISE EXCEPTION USING ERRCODE = '23505',
            MESSAGE = pg_catalog.format('the instance names %s hold the kept data of another '
                                        'subscription', NEW.dokku_app_name);
    END IF;
    RETURN NEW;
END;
$$;
REVOKE ALL ON FUNCTION public.instances_names_not_anothers() FROM PUBLIC, anon, authenticated;

CREATE TRIGGER instances_names_not_anothers BEFORE INSERT ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.instances_names_not_anothers();
