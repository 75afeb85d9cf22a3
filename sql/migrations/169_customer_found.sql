-- 169_customer_found.sql: a Stripe customer made for an attempt whose outcome we never
-- learnt is found at Stripe, not made a second time.
--
-- create-checkout-session makes the account's Stripe customer as an attempt
-- (050_billing.sql): a repeat after a lost answer resends its Idempotency-Key and
-- Stripe replays what it did. But Stripe keeps a key's first answer once it began
-- executing the request, a 500 too, and a 500 does not say whether the customer was
-- made: the attempt is closed ('failed') and the next call makes a new attempt with a
-- new key, which could leave a second customer of one account at Stripe, the first one
-- unused. Now, while the account has no customer and one of its customer attempts was
-- closed without a customer ('failed', or 'abandoned': given up for a newer one), the
-- function first lists Stripe's customers with the account's email (GET
-- /v1/customers?email=, consistent, unlike the search API) and takes the oldest whose
-- metadata.account_id is the account, recording it with billing_customer_found instead
-- of making one. A pending attempt is still resumed with its own key as before (Stripe
-- replays what it did).
--
-- - billing_customer_unsure(account) (new): whether such an attempt exists;
-- - billing_customer_found(account, customer, livemode) (new): links the customer to
--   the account (as a customer attempt's success does: only an account without one),
--   records the account's pending customer attempts abandoned (their keys are never
--   sent again) and the customer as a succeeded customer attempt whose key was never
--   sent (calls 0: the record that it is ours, which the webhook's account links
--   read), and audits billing.customer_found; returns the account's customer;
-- - billing_link_customer(account, customer) (new): the one rule both use;
-- - billing_attempt_succeeded: redefined whole from 127_checkout_one_payable.sql,
--   unchanged but for the link, which it now leaves to billing_link_customer.

-- Links p_customer to the account unless it has a customer already; returns the
-- account's customer afterwards (NULL when the account is gone).
CREATE FUNCTION public.billing_link_customer(p_account_id uuid, p_customer text)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_cust text;
BEGIN
    UPDATE public.accounts SET stripe_customer_id = p_customer
     WHERE id = p_account_id AND stripe_customer_id IS NULL;
    SELECT a.stripe_customer_id INTO v_cust FROM public.accounts a WHERE a.id = p_account_id;
    RETURN v_cust;
END;
$$;

CREATE FUNCTION public.billing_customer_unsure(p_account_id uuid)
RETURNS boolean
LANGUAGE sql STABLE
SET search_path = ''
AS $$
    SELECT EXISTS (SELECT 1 FROM public.billing_attempts b
                    WHERE b.account_id = p_account_id AND b.kind = 'customer'
                      AND b.status IN ('failed', 'abandoned'))
$$;

CREATE FUNCTION public.billing_customer_found(p_account_id uuid, p_customer text,
                                              p_livemode boolean)
RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v_cust text;
BEGIN
    IF p_account_id IS NULL OR p_customer IS NULL OR p_customer !~ '^cus_[A-Za-z0-9]{1,250}$' THEN
        RAISE EXCEPTION 'an account and a Stripe customer id are required' USING ERRCODE = '22023';
    END IF;
    v_cust := public.billing_link_customer(p_account_id, p_customer);
    IF v_cust IS NULL THEN
        RAISE EXCEPTION 'unknown account' USING ERRCODE = 'P0002';
    END IF;
    IF v_cust = p_customer THEN
        UPDATE public.billing_attempts SET status = 'abandoned',
               error = 'the account''s customer was found at Stripe: ' || p_customer
         WHERE account_id = p_account_id AND kind = 'customer' AND status = 'pending';
        -- The record that this customer was made by us for the account, as a made
        -- one's succeeded attempt is (the webhook's account links read it): a row
        -- whose key was never sent (calls 0).
        INSERT INTO public.billing_attempts (account_id, kind, idempotency_key, fingerprint,
                                             status, calls, object_id, livemode, error)
        SELECT p_account_id, 'customer', 'mindroom-customer-found-' || gen_random_uuid(),
               encode(sha256(convert_to('GET /v1/customers ' || p_customer, 'UTF8')), 'hex'),
               'succeeded', 0, p_customer, p_livemode,
               'found at Stripe: made for an attempt whose answer did not say so'
         WHERE NOT EXISTS (SELECT 1 FROM public.billing_attempts b
                            WHERE b.account_id = p_account_id AND b.kind = 'customer'
                              AND b.status = 'succeeded' AND b.object_id = p_customer);
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (p_account_id, 'billing.customer_found',
                jsonb_build_object('object_id', p_customer, 'livemode', p_livemode));
    END IF;
    RETURN v_cust;
END;
$$;

CREATE OR REPLACE FUNCTION public.billing_attempt_succeeded(p_attempt_id uuid, p_object_id text, p_url text,
                                                            p_expires_at bigint, p_livemode boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = ''
AS $$
DECLARE
    v      public.billing_attempts;
    v_cust text;
    v_note text;
BEGIN
    SELECT * INTO v FROM public.billing_attempts b WHERE b.id = p_attempt_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown attempt' USING ERRCODE = 'P0002';
    END IF;
    IF v.kind = 'customer' THEN
        v_cust := public.billing_link_customer(v.account_id, p_object_id);
        IF v_cust IS DISTINCT FROM p_object_id THEN
            v_note := 'account already linked to another customer; this one is unused';
        END IF;
    END IF;
    IF v.status NOT IN ('succeeded', 'completed') THEN
        UPDATE public.billing_attempts SET
            status     = 'succeeded',
            object_id  = p_object_id,
            url        = p_url,
            expires_at = pg_catalog.to_timestamp(p_expires_at),
            livemode   = p_livemode,
            error      = v_note
        WHERE id = v.id;
        INSERT INTO public.audit_logs (account_id, action, details)
        VALUES (v.account_id, 'billing.' || v.kind || '_created',
                jsonb_build_object('attempt_id', v.id, 'object_id', p_object_id,
                                   'livemode', p_livemode));
    END IF;
    RETURN jsonb_build_object('object_id', coalesce(v_cust, p_object_id), 'url', p_url,
                              'expires_at', p_expires_at);
END;
$$;

DO $grants$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'public.billing_link_customer(uuid, text)',
        'public.billing_customer_unsure(uuid)',
        'public.billing_customer_found(uuid, text, boolean)']
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC, anon, authenticated', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
    END LOOP;
END
$grants$;
