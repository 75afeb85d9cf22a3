-- 186_returning_customer_keeps_data.sql: a customer who subscribes again while the
-- data of its cancelled instance is kept gets that instance back: its names (its
-- address), its storage, its homeserver and its operator variables.
--
-- A destroy keeps an instance's storage for MINDROOM_RETENTION_DAYS, and an instance
-- made again under the same names on the same provisioner takes it over
-- (instances_take_kept_storage, and the worker's `predecessor`: the homeserver's keys,
-- server_name and env variables). The names came only from the subscription's id
-- (instance_names), so the data came back only when the same subscription was
-- provisioned again. A customer who cancelled and subscribed again through Checkout
-- has a new Stripe subscription, hence new names and new, empty storage, while the
-- data of its cancelled instance, its agents' rooms and configuration, waited out its
-- retention and was destroyed.
--
-- Now an instance inserted for a subscription under its names takes the names of the newest destroyed
-- instance of the same account whose data is kept and may be taken over: its storage
-- neither destroyed, nor taken over, nor to be purged, its retention not over, its
-- destroy_storage not under way (no lease), and no live instance under those names.
-- The subscription's own such instance comes first (the same subscription provisioned
-- again: its earlier instance may itself have taken another's names). Otherwise the
-- names stay instance_names(subscription). The takeover then happens as it always
-- did, by name and provisioner: placement prefers the provisioner that holds the data
-- (public.target_of_kept_storage), and one placed elsewhere starts on new, empty
-- entries and gives the data back. Only the account's own data: a 48-bit collision
-- with another account's kept data is still refused (179).
--
-- The trigger is named to run before every other BEFORE INSERT trigger of instances
-- (PostgreSQL fires them in name order): the checks of 179, the plan limits, the
-- placement and the owed work all see the names the row will have.
--
-- Redefines public.instances_names_not_anothers (179_kept_storage_one_subscription.sql):
-- data kept for another subscription of the same account is not another's.
--
-- SECURITY DEFINER: whoever inserts (the webhook, provision-instance) must not miss a
-- row to RLS.

CREATE FUNCTION public.instances_names_of_kept_data()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
DECLARE
    v_app text;
    v_subdomain text;
BEGIN
    -- A new instance under its subscription's names: not a row inserted destroyed (an
    -- import), nor one given names of its own.
    IF NEW.status = 'deprovisioned' OR NEW.dokku_app_name IS DISTINCT FROM
       (SELECT n.dokku_app_name FROM public.instance_names(NEW.subscription_id) n) THEN
        RETURN NEW;
    END IF;
    SELECT x.dokku_app_name, x.subdomain INTO v_app, v_subdomain
      FROM public.subscriptions mine
      JOIN public.subscriptions s ON s.account_id = mine.account_id
      JOIN public.instances x ON x.subscription_id = s.id
     WHERE mine.id = NEW.subscription_id
       AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
       AND x.storage_taken_by IS NULL AND NOT x.purge_requested
       AND x.claimed_by IS NULL
       AND (x.storage_destroy_after IS NULL OR x.storage_destroy_after > now())
       AND NOT EXISTS (SELECT 1 FROM public.instances l
                        WHERE l.dokku_app_name = x.dokku_app_name AND l.status <> 'deprovisioned')
     ORDER BY (s.id = NEW.subscription_id) DESC, x.deprovisioned_at DESC NULLS LAST,
              x.created_at DESC, x.id
     LIMIT 1;
    IF FOUND THEN
        NEW.dokku_app_name := v_app;
        NEW.subdomain := v_subdomain;
    END IF;
    RETURN NEW;
END;
$$;
REVOKE ALL ON FUNCTION public.instances_names_of_kept_data() FROM PUBLIC, anon, authenticated;

CREATE TRIGGER instances_a_names_of_kept_data BEFORE INSERT ON public.instances
    FOR EACH ROW EXECUTE FUNCTION public.instances_names_of_kept_data();

CREATE OR REPLACE FUNCTION public.instances_names_not_anothers()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = ''
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.instances x
                 JOIN public.subscriptions s ON s.id = x.subscription_id
                WHERE x.dokku_app_name = NEW.dokku_app_name
                  AND x.status = 'deprovisioned' AND x.storage_destroyed_at IS NULL
                  AND x.storage_taken_by IS NULL AND NOT x.purge_requested
                  AND x.subscription_id <> NEW.subscription_id
                  AND s.account_id <> (SELECT m.account_id FROM public.subscriptions m
                                        WHERE m.id = NEW.subscription_id)) THEN
        RAISE EXCEPTION USING ERRCODE = '23505',
            MESSAGE = pg_catalog.format('the instance names %s hold the kept data of another '
                                        'subscription', NEW.dokku_app_name);
    END IF;
    RETURN NEW;
END;
$$;
