"""The chat page in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium): pick an image, ask,
watch the answer stream in, ask again; the page's answers are the API's. Saves a screenshot."""
import base64
import shutil

import numpy as np
import openai
import pytest
from fixtures_serve import served  # noqa: F401  (pytest fixture)
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
  assert CHROMIUM and CHROMEDRIVER, "install Debian's chromium and chromium-driver (`make install` does, as root)"
  options = Options()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,700"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()


def _ask(driver, text):
  """Types text, sends it, waits for the streamed answer to finish -> its text."""
  answers = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant, .message.error"))
  driver.find_element(By.ID, "prompt").send_keys(text)
  driver.find_element(By.ID, "send").click()
  wait = WebDriverWait(driver, 120)
  wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-done='true']")) > answers)
  last = driver.find_elements(By.CSS_SELECTOR, "[data-done='true']")[-1]
  assert "error" not in last.get_attribute("class"), last.text
  return last.find_element(By.CLASS_NAME, "text").get_attribute("textContent"), last.get_attribute(
      "data-finish-reason")


def test_the_page_streams_answers_equal_to_the_api(served, browser, tmp_path):
  _, url, _ = served
  image = np.random.RandomState(1).randint(0, 256, (24, 40, 3)).astype(np.uint8)
  path = tmp_path / "picked.png"
  Image.fromarray(image).save(path)
  browser.get(url + "/")
  WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
  browser.find_element(By.ID, "max-tokens").send_keys("12")
  browser.find_element(By.ID, "image-input").send_keys(str(path))
  WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"))
  first, reason = _ask(browser, "What colour is the circle?")
  second, _ = _ask(browser, "How many shapes are there?")

  # The API, asked the same conversation (the page sends the file's bytes as a data: URL), answers the same.
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
  data_url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
  messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                           {"type": "text", "text": "What colour is the circle?"}]}]
  want = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12).choices[0]
  assert (first, reason) == (want.message.content, want.finish_reason) and first
  messages += [{"role": "assistant", "content": first},
               {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]}]
  assert second == client.chat.completions.create(model="tiny", messages=messages, max_tokens=12
                                                  ).choices[0].message.content
  assert len(browser.find_elements(By.CSS_SELECTOR, ".message.user img")) == 1

  shot = tmp_path / "chat_page.png"
  assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
  print(f"screenshot: {shot}")
